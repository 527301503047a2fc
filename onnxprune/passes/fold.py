"""The ``fold`` pass: physically remove channels that are zero or constant, exactly."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.groups import class_mask, classes_of, last_channel_classes
from onnxprune.analysis.handlers.recurrent import RECURRENT
from onnxprune.analysis.labels import (
    ClassId,
    GroupRewrite,
    Member,
    ReshapeRewrite,
    Rewrite,
    ShapeRewrite,
    Sink,
    SliceRewrite,
    SplitRewrite,
    State,
)
from onnxprune.analysis.probe import Probe, probe_run, shrink_shapes
from onnxprune.analysis.state import NOTHING_TO_PRUNE, Analysis
from onnxprune.analysis.walk import analyse
from onnxprune.cost import count_parameters
from onnxprune.graph import (
    add_gate_bias,
    add_output_bias,
    allow_unlisted_initializers,
    clear_value_info,
    get_init,
    outer_names_read_by_subgraphs,
    prepare_for_pruning,
    release_maps,
    remove_attr,
    set_attr,
    unique_name,
)
from onnxprune.passes.base import Pass, PassResult, option
from onnxprune.passes.fold_report import lost_zeros, merge_blocked, round_report
from onnxprune.passes.registry import register_pass
from onnxprune.passes.shape_targets import remove_dead, rewrite_shape_target
from onnxprune.runtime import keep_apart, puts_apart
from onnxprune.scratch import Writer
from onnxprune.validation.selfcheck import Reference, plain_reference, verify_same

if TYPE_CHECKING:
    from onnxprune.context import Context

IR_RAISED = "IR version raised to 4 (IR < 4 lists every initializer as a graph input)"


@dataclass
class Plan:
    """Which channel classes go, and why the others stay.

    Attributes:
        roots: the class of every channel id (``Analysis.roots``).
        removed: the classes that go.
        blocked: class -> why it stays, for the report.
        held: class -> why it stays, for the zero or constant classes only (what fold was
            there to remove): the report's ``shortfall``.
        values: (sink index, position in the sink's labels) -> the constant value that a
            removed channel had there, to move into that consumer's bias.
    """

    roots: np.ndarray
    removed: set[ClassId] = field(default_factory=set)
    blocked: dict[ClassId, str] = field(default_factory=dict)
    held: dict[ClassId, str] = field(default_factory=dict)
    values: dict[tuple[int, int], float] = field(default_factory=dict)

    _gone: np.ndarray | None = field(default=None, repr=False, compare=False)

    def keep(self, ids: np.ndarray) -> np.ndarray:
        """Mask of positions that stay (unlabelled positions always stay); ``removed`` is final
        once this is called (its per-channel mask is built once: linear in ``ids``)."""
        if self._gone is None:
            self._gone = class_mask(self.roots, self.removed)
        return ~self._gone[ids] | (ids < 0)


@dataclass
class FoldResult(PassResult):
    """Fold's result, with the input model's outputs on the probe inputs for :meth:`Fold.ensures`."""

    reference: Reference | None = field(default=None, repr=False, compare=False)


@register_pass
@dataclass
class Fold(Pass):
    """Remove channels that are zero (or constant) wherever used, rewriting every coupled tensor.

    Rules:
        1. A channel class (channels the analysis ties together) goes when, at every weighted
           consumer that reads it, its value is provably zero or a data-independent constant.
        2. A constant is moved into the consumer's bias (Conv, Gemm, MatMul + a new Add), except
           where the consumer zero-pads that input (the border would see 0, not the constant)
           or its weight is quantized (a QDQ layer: its int bias cannot take it exactly).
        3. Pinned channels (graph outputs, unknown ops, subgraphs, LayerNorm over the hidden
           size...) stay; so does the last channel of any tensor.
        4. Rounds repeat until nothing changes (at most ``max_rounds``): removing one layer's
           channels can make the next layer's channels constant. Zero or constant channels
           that stay are listed per group, with the reason, in ``shortfall`` (``kept_zero``
           counts them).
        5. Postcondition (``verify``): when channels went, the folded model gives the input
           model's outputs on a synthetic batch, both run the same plain way, within a tolerance
           that follows each output's dtype (:mod:`onnxprune.validation.selfcheck`).
        6. An IR < 4 model whose initializers stop being listed as inputs gets IR version 4;
           ``note`` says so, and says when there is nothing to prune (no channel groups).
    """

    name: ClassVar[str] = "fold"
    constants: bool = option(True, "also remove constant non-zero channels into the next bias")
    tolerance: float = option(
        1e-5, "relative spread allowed for a constant channel in the probe", low=0
    )
    max_rounds: int = option(4, "repeat analysis and removal at most this often", low=1)
    verify: bool = option(True, "run the model before and after on a sample and fail if it differs")

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        if self.tolerance < 0:
            raise ValueError("tolerance must be >= 0")

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Fold ``model`` in place; report per group what went and what could not."""
        params_before = count_parameters(model)
        lifted = prepare_for_pruning(model.graph)
        raised = allow_unlisted_initializers(model)
        removed_total = 0
        rounds = []
        reference = None
        first = pr = probe_run(model, ctx)
        an = analyse(model, pr.shapes)
        nothing = "" if an.spaces else NOTHING_TO_PRUNE
        for round_index in range(self.max_rounds):
            if round_index:
                # shapes are known without a run; probe only if a channel may now be constant
                an = analyse(model, pr.shapes)
                if _may_be_constant(an):
                    pr = probe_run(model, ctx)
                    an = analyse(model, pr.shapes)
            release_maps()  # pages the analysis read from mapped weights (read again on demand)
            plan = self.plan(an, pr)
            rounds.append(round_report(an, plan))
            if not plan.removed:
                break
            if self.verify and reference is None:  # the input model, before the first cut
                reference = plain_reference(model, first, ctx.providers)
            changes = _shape_changes(an, plan)
            removed_total += apply_plan(model, an, plan)
            shapes = shrink_shapes(pr.shapes, changes)
            if all(o in shapes for n in model.graph.node for o in n.output if o):
                pr = Probe(shapes, {}, pr.error)
            else:  # fold inserted nodes (a bias Add after a MatMul): shapes from a real run
                pr = probe_run(model, ctx)
        del an  # its cached weight arrays are not needed for the verification run
        report: dict[str, Any] = {
            "channels_removed": removed_total,
            "rounds": len(rounds),
            "constants_lifted": lifted,
            "parameters_before": params_before,
            "parameters_after": count_parameters(model),
            "groups": rounds[0]["groups"] if rounds else [],
            "blocked": merge_blocked(rounds),
            "kept_zero": sum(r["kept"] for r in rounds[-1]["shortfall"]) if rounds else 0,
            "shortfall": rounds[-1]["shortfall"] if rounds else [],
        }
        if first.error:
            report["probe_error"] = first.error
        notes = [n for n in (nothing, IR_RAISED if raised else "") if n]
        if notes:
            report["note"] = "; ".join(notes)
        modified = removed_total > 0 or lifted > 0 or raised
        return FoldResult(model, modified, report, reference)

    def ensures(self, result: PassResult, ctx: Context) -> None:
        """onnx.checker passes, and (rule 5) the outputs are those of the input model."""
        super().ensures(result, ctx)
        if isinstance(result, FoldResult) and result.reference is not None:
            keep_apart(result.model)  # cut weights written once, for every later session
            result.report["verified"] = verify_same(result.reference, result.model)
            result.reference = None  # the probe's tensors are not needed any more

    def plan(self, an: Analysis, pr: Probe) -> Plan:
        """Decide which channel classes to remove (rules 1-3)."""
        roots = an.roots()
        plan = Plan(roots)
        pinned = an.pinned_roots()
        candidates = classes_of(roots, an.spaces)
        bad: dict[ClassId, str] = {}
        constant: set[ClassId] = set()
        variable: set[ClassId] = set()  # read as a variable somewhere
        for k, sink in enumerate(an.sinks):
            quantized = sink.weight in an.dequantized
            self._judge_sink(k, sink, roots, pr, plan, bad, constant, quantized)
            ids = sink.labels.ids[(sink.labels.ids >= 0) & (sink.labels.state == State.VAR)]
            variable.update(ClassId(int(r)) for r in np.unique(roots[ids]))
        # a class that no weighted consumer reads but that is not pinned is dead: it may go too
        for r in candidates:
            if r in pinned:
                if r in constant or r not in bad:
                    plan.blocked.setdefault(r, pinned[r])
                continue
            if r in bad:
                if bad[r] != "variable":
                    plan.blocked[r] = bad[r]
                continue
            plan.removed.add(r)
        for r in last_channel_classes(an, plan.removed):
            plan.removed.discard(r)
            plan.blocked[r] = "last channel of its tensor is kept"
        for r in constant - variable - plan.removed:
            plan.held[r] = plan.blocked.get(r) or pinned.get(r) or "kept"
        for r, why in lost_zeros(an, roots, plan.removed | plan.held.keys()).items():
            plan.held[r] = pinned.get(r) or why  # zero at its producers: never silently kept
        return plan

    def _judge_sink(
        self,
        k: int,
        sink: Sink,
        roots: np.ndarray,
        pr: Probe,
        plan: Plan,
        bad: dict[ClassId, str],
        constant: set[ClassId],
        quantized: bool = False,
    ) -> None:
        """Judge each class that sink ``k`` reads: VAR is ``bad``; a ZERO or CONST channel
        whose probe value is one finite number gets that value in ``plan.values`` (rule 2)."""
        lab = sink.labels
        value = pr.values.get(sink.tensor)
        flat = None
        if value is not None:
            flat = np.moveaxis(value, lab.axis, 0).reshape(len(lab.ids), -1).astype(np.float64)
        for j, (cid, st) in enumerate(zip(lab.ids.tolist(), lab.state.tolist(), strict=True)):
            if cid < 0:
                continue
            r = ClassId(int(roots[cid]))
            if st == State.VAR:
                bad.setdefault(r, "variable")
                continue
            constant.add(r)
            if flat is None:
                if st != State.ZERO:
                    bad[r] = "constant channel, but the model could not be run to get its value"
                continue
            col = flat[j]
            v = float(col[0]) if col.size else 0.0
            spread = float(col.max() - col.min()) if col.size else 0.0
            if not np.isfinite(col).all() or spread > self.tolerance * (1.0 + abs(v)):
                bad[r] = "analysis says constant but the probe run disagrees: kept to be safe"
                continue
            if st == State.ZERO and v != 0.0:
                bad[r] = "analysis says zero but the probe run disagrees: kept to be safe"
                continue
            if v != 0.0:
                if not self.constants:
                    bad[r] = "constant non-zero channel (constants=false)"
                    continue
                if quantized or sink.scope:  # an int bias, or a bias inside an If branch
                    where = f"inside {sink.scope}" if sink.scope else "a quantized layer"
                    bad[r] = f"constant channel feeds {where} ({sink.node.op_type})"
                    continue
                if sink.padded:
                    bad[r] = (
                        f"constant channel feeds {sink.node.op_type} "
                        f"{sink.node.name or sink.node.output[0]}, which zero-pads its input"
                    )
                    continue
            plan.values[(k, j)] = v


def _may_be_constant(an: Analysis) -> bool:
    """Whether any free channel is read as zero or constant somewhere (worth a probe run)."""
    roots = an.roots()
    pinned = an.pinned_roots()
    for sink in an.sinks:
        ids, state = sink.labels.ids, sink.labels.state
        for cid in ids[(ids >= 0) & (state != State.VAR)].tolist():
            if int(roots[cid]) not in pinned:
                return True
    return False


def _shape_changes(an: Analysis, plan: Plan) -> dict[str, tuple[int, int]]:
    """New size of the channel axis of every labelled tensor after ``plan``."""
    return {name: (lab.axis, int(plan.keep(lab.ids).sum())) for name, lab in an.labels.items()}


def apply_plan(model: onnx.ModelProto, an: Analysis, plan: Plan) -> int:
    """Fold constants into biases, slice every member, rewrite shape constants. Returns count."""
    graph = model.graph
    an.release_arrays()  # the planning copies of the weights: not needed to cut them
    _fold_biases(graph, an, plan)
    cuts: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for m in an.members:  # the first member of each (initializer, axis) decides
        cuts[m.init].setdefault(m.axis, plan.keep(m.ids))
    with Writer(puts_apart(model)) as scratch:  # a large model's cut weights: to a file
        for init, by_axis in cuts.items():
            cut = [(axis, keep) for axis, keep in by_axis.items() if not keep.all()]
            if cut:  # an uncut weight stays as it is (in its file when mapped)
                arr = get_init(graph, init)
                for axis, keep in cut:
                    arr = np.compress(keep, arr, axis=axis)
                scratch.replace(graph, init, arr)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    detached: list[onnx.NodeProto] = []
    for rw in an.rewrites:
        if isinstance(rw, ShapeRewrite):
            detached += rewrite_shape_target(graph, rw, int(plan.keep(rw.ids).sum()))
        else:
            _rewrite(graph, rw, plan, opset)
    remove_dead(graph, detached)
    clear_value_info(graph)  # subgraphs too: their outputs may have fewer channels
    _remove_unused_initializers(graph)
    release_maps()  # the pages the cuts read from mapped weights: not needed in this process
    return len(plan.removed)


def _fold_biases(graph: onnx.GraphProto, an: Analysis, plan: Plan) -> None:
    """Add each removed constant channel's contribution to its consumer's bias (rule 2)."""
    per_sink: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (k, j), v in plan.values.items():
        sink = an.sinks[k]
        cid = int(sink.labels.ids[j])
        if v != 0.0 and int(plan.roots[cid]) in plan.removed:
            per_sink[k].append((j, v))
    for k, items in per_sink.items():
        sink = an.sinks[k]
        w = get_init(graph, sink.weight)
        wk = np.moveaxis(w.astype(np.float64), sink.weight_axis, 0)  # [K, ...]
        delta = sum(v * wk[j] for j, v in items)
        _add_to_bias(graph, an, sink, np.asarray(delta), w.dtype)


def _add_to_bias(
    graph: onnx.GraphProto, an: Analysis, sink: Sink, delta: np.ndarray, dtype: np.dtype
) -> None:
    """Add ``delta`` to the sink's output bias and keep that bias a member of its outputs."""
    node = sink.node
    if node.op_type in RECURRENT:  # the gates' input bias; the hidden size stays
        add_gate_bias(graph, node, delta.astype(dtype))
        return
    if node.op_type == "Conv":
        delta = delta.reshape(delta.shape[0], -1).sum(axis=1)  # [Cout]
    out_lab = an.labels.get(node.output[0])  # before a MatMul's output moves to a new Add
    change = add_output_bias(graph, node, delta.astype(dtype))
    if change.previous and change.previous != change.init:
        for m in list(an.members):
            if m.init == change.previous:
                an.members.append(Member(change.init, m.axis, m.ids, m.role))
    registered = any(m.init == change.init for m in an.members)
    if change.per_channel and not registered and out_lab is not None:
        an.members.append(Member(change.init, change.axis, out_lab.ids, "bias"))


def _rewrite(graph: onnx.GraphProto, rw: Rewrite, plan: Plan, opset: int) -> None:
    """Recompute the shape constant or attribute ``rw`` for the channels ``plan`` keeps."""
    node = rw.node
    match rw:
        case GroupRewrite():
            set_attr(node, "group", int(plan.keep(rw.ids).sum()))
        case ReshapeRewrite():
            target = get_init(graph, node.input[1]).copy()
            if target[rw.axis] > 0:  # 0 and -1 are worked out by the runtime
                target[rw.axis] = int(plan.keep(rw.ids).sum())
                name = unique_name(graph, f"{node.input[1]}_folded")
                graph.initializer.append(numpy_helper.from_array(target, name))
                node.input[1] = name
        case SplitRewrite():
            _rewrite_split(graph, rw, plan, opset)
        case SliceRewrite():
            keep = plan.keep(rw.ids)
            new_start = int(keep[: rw.start].sum())
            new_stop = new_start + int(keep[rw.start : rw.stop].sum())
            for index, value in ((1, new_start), (2, new_stop)):
                arr = get_init(graph, node.input[index]).copy()
                arr[rw.k] = value
                name = unique_name(graph, f"{node.input[index]}_folded")
                graph.initializer.append(numpy_helper.from_array(arr, name))
                node.input[index] = name


def _rewrite_split(graph: onnx.GraphProto, rw: SplitRewrite, plan: Plan, opset: int) -> None:
    """New split sizes: an input from opset 13 on (replacing ``num_outputs``), else the attribute."""
    node = rw.node
    sizes = np.array([int(plan.keep(ids).sum()) for ids in rw.parts], dtype=np.int64)
    if opset >= 13:
        name = unique_name(graph, f"{node.name or node.output[0]}_split_sizes")
        graph.initializer.append(numpy_helper.from_array(sizes, name))
        while len(node.input) < 2:
            node.input.append("")
        node.input[1] = name
        remove_attr(node, "num_outputs")
    else:
        set_attr(node, "split", sizes.tolist())


def _remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers that no node, graph output or subgraph (at any depth) reads."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    used |= outer_names_read_by_subgraphs(graph)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
