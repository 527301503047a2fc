"""The ``validate`` pass: compare the model with the original on data, and record gates."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.cost import summarize
from onnxprune.data import (
    Dataset,
    feeds_for,
    fixed_batch,
    input_specs,
    sample_count,
    take_samples,
)
from onnxprune.errors import (
    DataError,
    PassFailedError,
    PassOptionError,
    UnsupportedModelError,
)
from onnxprune.passes.base import Pass, PassResult, option, require_original
from onnxprune.passes.registry import register_pass
from onnxprune.runtime import CPU, channel_multiple, session
from onnxprune.validation.compare import (
    ClassificationComparison,
    InputMismatch,
    OutputComparison,
    OutputMismatch,
    compare_classification,
    compare_output,
    is_classifier_like,
)
from onnxprune.validation.latency import LatencyComparison, compare_latency

if TYPE_CHECKING:
    from onnxprune.context import Context

SHORT_RUN_MS = 0.2
SLOW_MARGIN = 0.05  # flag "slower" past this share, and only beyond run-to-run noise


@register_pass
@dataclass
class Validate(Pass):
    """Compare with the original model: outputs, accuracy, cost, latency; record the gates.

    Rules:
        1. Both models run on the context's data (``--data``, else inputs synthesised from the
           original's declared shapes), batch by batch, at most ``samples`` samples.
        2. Every output of the original is compared (``metrics.compare_output``): max and mean
           absolute and relative error, cosine similarity, top-1 agreement when classifier-like.
        3. The first classifier-like output (or ``label_output``) is scored against the labels,
           or against the original's predictions when there are none.
        4. Cost: parameters, MACs per op type (symbolic dims taken from the timed batch), bytes.
        5. Latency (``runs`` > 0): both models on one batch of ``latency_batch`` samples,
           ``warmup`` rounds, then interleaved runs (``latency.interleaved``); median and p90.
           A pruned model slower by more than 5% (beyond the median-to-p90 noise) is flagged
           with its likely cause.
        6. Gates are recorded, never raised: ``finite`` per output (new NaN/Inf: always),
           ``min_cosine`` per output, ``max_accuracy_drop`` and ``max_latency_ratio`` when set,
           each as {name, output, value, limit, passed}.
        7. Errors (not gates): a missing or reshaped output (:class:`OutputMismatch`), an input
           the pruned model lacks or refuses (:class:`InputMismatch`), both exit code 1.
    """

    name: ClassVar[str] = "validate"
    needs_original: ClassVar[bool] = True
    max_accuracy_drop: float | None = option(None, "gate: largest allowed accuracy drop (0-1)")
    min_cosine: float | None = option(None, "gate: smallest allowed mean cosine of each output")
    max_latency_ratio: float | None = option(
        None, "gate: largest allowed pruned/original median latency"
    )
    runs: int = option(30, "timed runs per model (0: no latency)")
    warmup: int = option(5, "untimed runs per model before timing")
    threads: int = option(0, "onnxruntime intra-op threads (0: onnxruntime's default)")
    latency_batch: int = option(1, "samples per timed run (a fixed-batch model uses its own)")
    samples: int = option(0, "compare on at most this many samples (0: all)")
    label_output: str | None = option(
        None, "output scored against the labels [default: first classifier-like]"
    )

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 1:
            raise ValueError("max_accuracy_drop must be between 0 and 1")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ValueError("min_cosine must be between -1 and 1")
        if self.max_latency_ratio is not None and self.max_latency_ratio <= 0:
            raise ValueError("max_latency_ratio must be > 0")
        if self.runs < 0 or self.warmup < 0 or self.threads < 0 or self.samples < 0:
            raise ValueError("runs, warmup, threads and samples must be >= 0")
        if self.latency_batch < 1:
            raise ValueError("latency_batch must be at least 1")
        if self.max_latency_ratio is not None and self.runs < 1:
            raise ValueError("max_latency_ratio needs runs >= 1")

    def requires(self, model: onnx.ModelProto, ctx: Context) -> None:
        """The context holds the original model (what the pruned one is compared with)."""
        require_original(ctx, self.name)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Apply rules 1-7; the model is returned unchanged."""
        original = require_original(ctx, self.name)
        data = ctx.data(original)
        if self.samples:
            data = _head(data, self.samples)
        check_inputs(original, model)
        ref_sess = session(original, ctx.providers, threads=self.threads, share_weights=False)
        new_sess = _pruned_session(model, ctx.providers, self.threads)
        ref, new, count = run_pair(ref_sess, new_sess, original, data)
        outputs = [
            compare_output(n, ref[n], new[n], min_cosine=self.min_cosine) for n in ref
        ]  # rule 2
        labels = data.labels[:count] if data.labels is not None else None
        classification = self._classify(ref, new, labels)  # rule 3
        feed = latency_feed(original, data, self.latency_batch)
        cost = cost_section(original, model, symbolic_dims([original, model], feed))  # rule 4
        warnings: list[str] = []
        if labels is not None and classification is None:
            warnings.append("labels ignored: no classifier-like output ([N, C] scores)")
        latency = None
        if self.runs:  # rule 5
            latency = self._latency(ref_sess, new_sess, feed, original, model)
            if latency["slower"]:
                warnings.append(slow_message(latency))
        gates = self._gates(outputs, classification, latency)  # rule 6
        report = {
            "data": {
                "source": data.source,
                "synthetic": data.synthetic,
                "samples": count,
                "labels": labels is not None,
            },
            "providers": new_sess.get_providers(),
            "outputs": [o.to_dict() for o in outputs],
            "classification": classification.to_dict() if classification is not None else None,
            "cost": cost,
            "latency": latency,
            "gates": gates,
            "passed": all(g["passed"] for g in gates),
            "warnings": warnings,
        }
        return PassResult(model, modified=False, report=report)

    def _classify(
        self,
        ref: Mapping[str, np.ndarray],
        new: Mapping[str, np.ndarray],
        labels: np.ndarray | None,
    ) -> ClassificationComparison | None:
        name = self.label_output
        if name is not None:
            if name not in ref:
                raise PassOptionError(
                    f"pass validate: label_output={name!r} is not an output "
                    f"(outputs: {', '.join(ref)})"
                )
            if not is_classifier_like(ref[name]):
                raise UnsupportedModelError(
                    f"validate: output {name!r} {list(ref[name].shape)} "
                    "is not classifier-like ([N, C] scores)"
                )
        else:
            name = next((n for n, a in ref.items() if is_classifier_like(a)), None)
        if name is None:
            if self.max_accuracy_drop is not None:
                shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in ref.items())
                raise UnsupportedModelError(
                    f"validate: max_accuracy_drop needs a classifier-like output ([N, C] "
                    f"scores); the outputs are {shapes}; use min_cosine instead"
                )
            return None
        return compare_classification(name, ref[name], new[name], labels, self.max_accuracy_drop)

    def _latency(
        self,
        ref_sess: ort.InferenceSession,
        new_sess: ort.InferenceSession,
        feed: Mapping[str, np.ndarray],
        original: onnx.ModelProto,
        model: onnx.ModelProto,
    ) -> dict[str, Any]:
        feed = dict(feed)
        cmp = compare_latency(
            lambda: ref_sess.run(None, feed),
            lambda: new_sess.run(None, feed),
            self.runs,
            self.warmup,
            max_ratio=self.max_latency_ratio,
        )
        provider = new_sess.get_providers()[0]
        return {
            "provider": provider,
            "threads": self.threads,
            "cpu_count": os.cpu_count(),
            "batch": sample_count(feed),
            "runs": self.runs,
            "warmup": self.warmup,
            "original": cmp.original.to_dict(),
            "pruned": cmp.pruned.to_dict(),
            "ratio": cmp.ratio,
            "slower": (slower := is_slower(cmp)),
            "causes": slow_causes(original, model, provider, cmp) if slower else [],
        }

    def _gates(
        self,
        outputs: Sequence[OutputComparison],
        classification: ClassificationComparison | None,
        latency: Mapping[str, Any] | None,
    ) -> list[dict[str, Any]]:
        gates = [_gate("finite", o.name, o.nonfinite, 0, o.nonfinite == 0) for o in outputs]
        if self.min_cosine is not None:
            for o in outputs:
                ok = o.cosine == o.cosine and o.cosine >= self.min_cosine  # NaN fails
                gates.append(
                    _gate("min_cosine", o.name, o.to_dict()["cosine"], self.min_cosine, ok)
                )
        if self.max_accuracy_drop is not None and classification is not None:
            gates.append(
                _gate(
                    "max_accuracy_drop",
                    classification.output,
                    classification.drop,
                    self.max_accuracy_drop,
                    bool(classification),
                )
            )
        if self.max_latency_ratio is not None and latency is not None:
            gates.append(
                _gate(
                    "max_latency_ratio",
                    None,
                    latency["ratio"],
                    self.max_latency_ratio,
                    latency["ratio"] <= self.max_latency_ratio,
                )
            )
        return gates


def _head(data: Dataset, samples: int) -> Dataset:
    """The first ``samples`` samples of ``data`` (labels too)."""
    labels = data.labels[:samples] if data.labels is not None else None
    inputs = {k: v[:samples] for k, v in data.inputs.items()}
    return Dataset(inputs, labels, data.source, data.synthetic)


def _gate(name: str, output: str | None, value: Any, limit: float, passed: bool) -> dict[str, Any]:
    return {"name": name, "output": output, "value": value, "limit": limit, "passed": bool(passed)}


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)


def _pruned_session(
    model: onnx.ModelProto, providers: Sequence[str], threads: int
) -> ort.InferenceSession:
    try:
        return session(model, providers, threads=threads, share_weights=False)
    except PassFailedError as exc:
        raise PassFailedError(f"validate: the pruned model: {exc}") from exc


def check_inputs(original: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Check that ``model`` declares every input of ``original`` with a compatible type and shape.

    Raises:
        InputMismatch: an input missing, added, of another dtype, rank or fixed size.
    """
    ref, new = input_specs(original), input_specs(model)
    for name, (dims, dtype) in ref.items():
        if name not in new:
            raise InputMismatch(
                f"validate: the pruned model has no input {name!r} "
                f"(its inputs: {', '.join(new) or 'none'})"
            )
        new_dims, new_dtype = new[name]
        if new_dtype != dtype:
            raise InputMismatch(
                f"validate: the pruned model cannot take input {name!r}: it "
                f"expects {new_dtype}, the original {dtype}"
            )
        fixed_differs = any(
            isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b
            for a, b in zip(dims, new_dims, strict=False)
        )
        if len(dims) != len(new_dims) or fixed_differs:
            raise InputMismatch(
                f"validate: the pruned model cannot take input {name!r}: it "
                f"declares {new_dims}, the original {dims}"
            )
    extra = [n for n in new if n not in ref]
    if extra:
        raise InputMismatch(
            f"validate: the pruned model needs input {extra[0]!r}, which the original does not have"
        )


def run_pair(
    ref_sess: ort.InferenceSession,
    new_sess: ort.InferenceSession,
    model: onnx.ModelProto,
    data: Dataset,
    limit: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Run both sessions on ``data`` in batches; outputs of each (original's names) and the count.

    Raises:
        OutputMismatch: the pruned model lacks an output of the original.
        InputMismatch: onnxruntime refuses the data for the pruned model (not the original).
        DataError: the original refuses the data, or no complete batch fits the model.
    """
    names = [o.name for o in ref_sess.get_outputs()]
    have = [o.name for o in new_sess.get_outputs()]
    missing = [n for n in names if n not in have]
    if missing:
        raise OutputMismatch(
            f"validate: the pruned model has no output {missing[0]!r} "
            f"(its outputs: {', '.join(have)})"
        )
    ref_parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    new_parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    count = 0
    for feed in feeds_for(model, data, limit):
        feed = dict(feed)
        try:
            ref_out = ref_sess.run(names, feed)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
            raise DataError(
                f"validate: the original model cannot run on {data.source}: {_first_line(exc)}"
            ) from exc
        try:
            new_out = new_sess.run(names, feed)
        except Exception as exc:  # noqa: BLE001
            raise InputMismatch(
                f"validate: the pruned model cannot take input(s) "
                f"{', '.join(map(repr, feed))}: {_first_line(exc)}"
            ) from exc
        for n, r, p in zip(names, ref_out, new_out, strict=True):
            ref_parts[n].append(np.asarray(r))
            new_parts[n].append(np.asarray(p))
        count += sample_count(feed) if feed else 1
    if not count:
        raise DataError(
            f"validate: {data.source} has no complete batch of "
            f"{fixed_batch(model)} samples for the model"
        )
    return _join(ref_parts), _join(new_parts), count


def _join(parts: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    for name, arrays in parts.items():
        shapes = {a.shape[1:] if a.ndim else None for a in arrays}
        if len(shapes) > 1:  # new model's per-sample shape varies with the batch: compare as is
            raise OutputMismatch(f"validate: output {name!r} has a different shape per batch")
        out[name] = np.concatenate(arrays) if arrays[0].ndim else np.stack(arrays)
    return out


def latency_feed(model: onnx.ModelProto, data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples of ``data`` (the model's own batch size when it is fixed)."""
    size = fixed_batch(model) or batch
    return {k: take_samples(v, 0, size) for k, v in data.inputs.items()}


def symbolic_dims(
    models: Sequence[onnx.ModelProto], feed: Mapping[str, np.ndarray]
) -> dict[str, int]:
    """Value of each symbolic input dimension of ``models``, read from ``feed``'s shapes."""
    dims: dict[str, int] = {}
    for m in models:
        for name, (declared, _) in input_specs(m).items():
            if name in feed:
                value = feed[name]  # a sequence input: the shape of its tensors
                value = value[0] if isinstance(value, list) and value else value
                for d, size in zip(declared, np.shape(value), strict=False):
                    if isinstance(d, str):
                        dims[d] = int(size)
    return dims


def cost_section(
    original: onnx.ModelProto, model: onnx.ModelProto, dims: Mapping[str, int]
) -> dict[str, Any]:
    """Parameters, MACs (total and per op type), bytes of both models, and pruned/original."""
    a, b = summarize(original, dims), summarize(model, dims)

    def pick(s: Any) -> dict[str, Any]:
        return {
            "parameters": s.parameters,
            "macs": s.macs,
            "macs_by_op": s.macs_by_op,
            "bytes": s.bytes,
        }

    ratio = {
        k: (getattr(b, k) / getattr(a, k) if getattr(a, k) else None)
        for k in ("parameters", "macs", "bytes")
    }
    return {"dims": dict(dims), "original": pick(a), "pruned": pick(b), "ratio": ratio}


def _conv_channels(model: onnx.ModelProto) -> list[tuple[str, int, int]]:
    """(name, out channels, in channels) of each Conv whose weight is an initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = list(inits[node.input[1]].dims)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if len(dims) >= 2:
            found.append((node.name or f"#{i}", dims[0], dims[1] * group))
    return found


def unaligned_convs(original: onnx.ModelProto, model: onnx.ModelProto) -> list[str]:
    """Convs whose channel counts were multiples of the NCHWc block in ``original`` and are
    not any more."""
    block = channel_multiple()
    before = {name: (o, i) for name, o, i in _conv_channels(original)}
    out = []
    for name, o, i in _conv_channels(model):
        if name not in before:
            continue
        o0, i0 = before[name]
        lost = [
            f"{what} {a}->{b}"
            for what, a, b in (("out", o0, o), ("in", i0, i))
            if a % block == 0 and b % block
        ]
        if lost:
            out.append(f"{name} ({', '.join(lost)})")
    return out


def is_slower(cmp: LatencyComparison) -> bool:
    """Pruned median more than ``SLOW_MARGIN`` above the original's, and beyond the noise."""
    return cmp.ratio > 1 + SLOW_MARGIN and not cmp.within_noise


def slow_causes(
    original: onnx.ModelProto, model: onnx.ModelProto, provider: str, cmp: LatencyComparison
) -> list[str]:
    """Likely reasons why the pruned model runs slower (known ones only)."""
    causes = []
    if provider == CPU:
        convs = unaligned_convs(original, model)
        if convs:
            shown = ", ".join(convs[:4]) + (f" and {len(convs) - 4} more" if len(convs) > 4 else "")
            causes.append(
                f"channel counts that are not multiples of {channel_multiple()} defeat "
                f"onnxruntime's blocked (NCHWc) convolution layout on this CPU: Conv {shown}; "
                f"prune to multiples of {channel_multiple()} (vote's round_to)"
            )
    if cmp.original.median_ms < SHORT_RUN_MS:
        causes.append(
            f"runs are very short ({cmp.original.median_ms:.3f} ms): onnxruntime's fixed "
            "per-node overhead dominates"
        )
    return causes


def slow_message(latency: Mapping[str, Any]) -> str:
    """One line: how much slower the pruned model runs, and why when known."""
    o, p = latency["original"], latency["pruned"]
    msg = (
        f"the pruned model is SLOWER than the original: median {p['median_ms']:.3f} ms vs "
        f"{o['median_ms']:.3f} ms (ratio {latency['ratio']:.2f}) on {latency['provider']}"
    )
    if latency["causes"]:
        msg += "; likely cause: " + "; ".join(latency["causes"])
    return msg


def validate_sections(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The validate sections of a run report, in chain order."""
    return [s for s in report.get("passes", []) if s.get("pass") == Validate.name]


def failed_gates(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every failed gate of every validate section of ``report``."""
    return [g for s in validate_sections(report) for g in s.get("gates", []) if not g["passed"]]


def describe_gate(gate: Mapping[str, Any]) -> str:
    """``max_accuracy_drop 0.8747 > 0.01 (output 'y')``: a gate's figures in a few words."""
    value, limit = gate["value"], gate["limit"]
    where = f" (output {gate['output']!r})" if gate["output"] else ""
    if gate["name"] == "finite":
        return f"finite: {value} new NaN/Inf values{where}"
    shown = "n/a" if value is None else f"{value:.4g}"
    sign = (
        ("<=" if gate["passed"] else ">")
        if gate["name"].startswith("max_")
        else (">=" if gate["passed"] else "<")
    )
    return f"{gate['name']} {shown} {sign} {limit:g}{where}"


def gate_message(failed: Sequence[Mapping[str, Any]]) -> str:
    """The one-line error for failed gates."""
    return "validation failed: " + "; ".join(describe_gate(g) for g in failed)


def with_gates(
    chain: Sequence[Pass], *, always: bool = False, **limits: float | None
) -> list[Pass]:
    """``chain`` with gate ``limits`` set on its last validate pass (appended when missing).

    A validate pass is appended when limits are given, or when ``always`` is true.

    Raises:
        PassOptionError: a limit out of range.
    """
    given = {k: v for k, v in limits.items() if v is not None}
    out = list(chain)
    index = next((i for i in range(len(out) - 1, -1, -1) if isinstance(out[i], Validate)), None)
    try:
        if index is not None:
            out[index] = dataclasses.replace(out[index], **given)
        elif given or always:
            out.append(Validate(**given))
    except ValueError as exc:
        raise PassOptionError(f"pass validate: {exc}") from exc
    return out
