"""Ensemble members: loaded, named, brought to one opset and IR version, prefixed.

Rules:
    1. A member path is read as given (relative to the working directory); a missing or
       unreadable member is a one-line error naming it.
    2. Every member has a unique name (its file stem; ``_2``, ``_3``... on a clash), and every
       name inside it (nodes, tensors, initializers, functions) is prefixed ``NAME/``.
    3. The fused model's standard opset is the highest among the members: lower ones are
       converted with onnx's version converter (a failure names the member and both opsets).
       Other domains (``ai.onnx.ml``...) are kept, at the highest version a member imports;
       the IR version is the highest among the members.
    4. A member has exactly one graph input, and its combined output is output ``index``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import compose, version_converter

from onnxprune.data import declared_dims, unwrap_type
from onnxprune.errors import ModelLoadError, UnsupportedModelError, first_line
from onnxprune.graph import graph_input_names, iter_graphs
from onnxprune.model import load

STANDARD = ("", "ai.onnx")


@dataclass
class Member:
    """One model of the ensemble: its name (the prefix), where it came from, the model."""

    name: str
    source: str
    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """What every name inside the member starts with in the fused graph."""
        return f"{self.name}/"


def load_members(paths: tuple[str, ...]) -> list[tuple[str, onnx.ModelProto]]:
    """Each member path with its model, loaded and checked (rule 1).

    Raises:
        ModelLoadError: a member is missing, unreadable or rejected by onnx.checker.
    """
    out = []
    for path in paths:
        try:
            out.append((path, load(Path(path))))
        except ModelLoadError as exc:
            raise ModelLoadError(f"pass fuse: member {first_line(exc)}") from exc
    return out


def unique_names(sources: list[str]) -> list[str]:
    """A name per member (rule 2): the file stem, made a plain identifier, unique."""
    names: list[str] = []
    for src in sources:
        stem = Path(src).stem or "model"
        base = "".join(c if c.isalnum() or c in "_-." else "_" for c in stem)
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def standard_opset(model: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version."""
    return next((o.version for o in model.opset_import if o.domain in STANDARD), 0)


def reconcile(members: list[Member]) -> tuple[int, int, dict[str, int]]:
    """Convert every member to the highest standard opset (rule 3), in place.

    Returns:
        The standard opset, the IR version and the other domains' versions of the fused model.

    Raises:
        UnsupportedModelError: the version converter fails on a member.
    """
    target = max(standard_opset(m.model) for m in members)
    for m in members:
        have = standard_opset(m.model)
        if have == target:
            continue
        try:
            converted = version_converter.convert_version(m.model, target)
            onnx.checker.check_model(converted)
        except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
            raise UnsupportedModelError(
                f"pass fuse: member {m.source}: onnx's version converter cannot bring opset "
                f"{have} to {target} ({type(exc).__name__}: {first_line(exc)}); export it at "
                f"opset {target}"
            ) from exc
        converted.ir_version = max(converted.ir_version, m.model.ir_version)
        m.model = converted
        m.notes.append(f"opset {have} -> {target}")
    domains: dict[str, int] = {}
    for m in members:
        for o in m.model.opset_import:
            if o.domain not in STANDARD:
                domains[o.domain] = max(domains.get(o.domain, 0), o.version)
    ir = max(m.model.ir_version for m in members)
    return target, ir, domains


def prefixed(member: Member) -> onnx.ModelProto:
    """The member's model with every name prefixed (rule 2)."""
    return compose.add_prefix(member.model, member.prefix)


def single_input(member: Member) -> onnx.ValueInfoProto:
    """The member's one graph input (rule 4).

    Raises:
        UnsupportedModelError: it has none or several, or the input is not a tensor.
    """
    names = graph_input_names(member.model.graph)
    if len(names) != 1:
        raise UnsupportedModelError(
            f"pass fuse: member {member.source} has {len(names)} inputs "
            f"({', '.join(names) or 'none'}); fuse combines models with one input each"
        )
    vi = next(i for i in member.model.graph.input if i.name == names[0])
    kind, tensor = unwrap_type(vi.type)
    if tensor is None or kind != "tensor":
        raise UnsupportedModelError(
            f"pass fuse: member {member.source}: input {vi.name!r} is a {kind}, not a tensor"
        )
    return vi


def input_dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    """The declared dims of a tensor value."""
    return declared_dims(vi.type.tensor_type)


def output_of(member: Member, index: int) -> onnx.ValueInfoProto:
    """The member's output ``index`` (rule 4).

    Raises:
        UnsupportedModelError: the member has no such output.
    """
    outs = member.model.graph.output
    if index >= len(outs):
        raise UnsupportedModelError(
            f"pass fuse: member {member.source} has {len(outs)} output(s); option output={index} "
            f"needs at least {index + 1}"
        )
    return outs[index]


def rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node of ``graph`` and its subgraphs that reads ``old`` reads ``new`` instead."""
    for g in iter_graphs(graph):
        for node in g.node:
            for k, name in enumerate(node.input):
                if name == old:
                    node.input[k] = new
        for out in g.output:
            if out.name == old:
                out.name = new
