"""The ``validate`` pass: compare the model with the original on data, and record gates."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import (
    PassFailedError,
    PassOptionError,
    UnsupportedModelError,
)
from onnxprune.passes.base import Pass, PassResult, option, require_original
from onnxprune.passes.registry import register_pass
from onnxprune.runner import runnable
from onnxprune.runtime import keep_apart, session
from onnxprune.validation.compare import (
    ClassificationComparison,
    OutputComparison,
    compare_classification,
    compare_output,
    is_classifier_like,
)
from onnxprune.validation.gates import gate
from onnxprune.validation.latency import CONFIDENCE, compare_latency, within_limit
from onnxprune.validation.layers import compare_layers
from onnxprune.validation.pair import (
    check_inputs,
    cost_section,
    latency_feed,
    run_pair,
    symbolic_dims,
)
from onnxprune.validation.sharded import sharded_pair
from onnxprune.validation.slow import is_slower, slow_causes, slow_message

if TYPE_CHECKING:
    from onnxprune.context import Context

DEFAULT_ACCURACY_DROP = 0.01  # with labels: at most one point of accuracy lost
DEFAULT_COSINE = 0.99  # without labels: every output's mean cosine at least this
LIMITS = ("max_accuracy_drop", "min_cosine", "max_latency_ratio")


@register_pass
@dataclass
class Validate(Pass):
    """Compare with the original model: outputs, accuracy, cost, latency; record the gates.

    Rules:
        1. Both models run on the context's evaluation data (``--eval-data``, else ``--data``,
           else inputs synthesised from the original's declared shapes), batch by batch, at
           most ``samples`` samples; the report's ``data.source`` names the file (or
           ``synthetic``).
        2. Every output of the original is compared (``compare.compare_output``): max and mean
           absolute and relative error, cosine similarity, top-1 agreement when classifier-like.
        3. The first classifier-like output (or ``label_output``) is scored against the labels,
           or against the original's predictions when there are none.
        4. Cost: parameters, MACs per op type (symbolic dims taken from the timed batch), bytes.
        5. Latency (``runs`` > 0): both models on one batch of ``latency_batch`` samples,
           ``warmup`` rounds, then interleaved runs (``latency.interleaved``); median, p90 and
           a 99% bootstrap interval of the ratio. A pruned model whose whole interval lies
           more than 5% above 1 is flagged as slower, with its likely cause.
        6. Gates are recorded, never raised, each as {name, output, value, limit, passed}:
           ``finite`` per output (new NaN/Inf), ``min_cosine`` per output,
           ``max_accuracy_drop``, ``max_latency_ratio`` (fails only when the ratio's whole
           interval lies more than 5% above the limit). With no limit set, the defaults hold:
           an accuracy drop of at most 0.01 when the data has labels and a classifier-like
           output, else a mean cosine of at least 0.99 for every output. ``gates=off``
           checks none.
        7. ``layers=true``: a layer diff (``validation.layers``): per tensor both models
           produce with the same shape, in graph order, cosine and max abs error on the first
           ``layer_samples`` samples; tensors whose shape pruning changed are counted as
           skipped. Recorded as ``layers``, ``layers_skipped``, ``layers_samples`` (null when
           off); no gate reads it.
        8. Errors (not gates): a missing or reshaped output (:class:`OutputMismatch`), an input
           the pruned model lacks or refuses (:class:`InputMismatch`), both exit code 1.
    """

    name: ClassVar[str] = "validate"
    needs_original: ClassVar[bool] = True
    max_accuracy_drop: float | None = option(
        None, "gate: largest allowed accuracy drop (0-1)", low=0, high=1
    )
    min_cosine: float | None = option(
        None, "gate: smallest allowed mean cosine of each output", low=-1, high=1
    )
    max_latency_ratio: float | None = option(
        None, "gate: largest allowed pruned/original median latency", above=0
    )
    gates: Literal["auto", "off"] = option(
        "auto",
        "auto: the limits set, or without any the defaults (accuracy drop <= 0.01 with "
        "labels, else cosine >= 0.99); off: check no gate",
    )
    runs: int = option(30, "timed runs per model (0: no latency)", low=0)
    warmup: int = option(5, "untimed runs per model before timing", low=0)
    threads: int = option(0, "onnxruntime intra-op threads (0: onnxruntime's default)", low=0)
    latency_batch: int = option(
        1, "samples per timed run (a fixed-batch model uses its own)", low=1
    )
    samples: int = option(0, "compare on at most this many samples (0: all)", low=0)
    label_output: str | None = option(
        None, "output scored against the labels [default: first classifier-like]"
    )
    layers: bool = option(
        False, "also compare every tensor both models share, in graph order (a layer diff)"
    )
    layer_samples: int = option(16, "samples the layer diff runs on", low=1)

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 1:
            raise ValueError("max_accuracy_drop must be between 0 and 1")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ValueError("min_cosine must be between -1 and 1")
        if self.max_latency_ratio is not None and self.max_latency_ratio <= 0:
            raise ValueError("max_latency_ratio must be > 0")
        if self.layer_samples < 1:
            raise ValueError("layer_samples must be at least 1")
        if self.runs < 0 or self.warmup < 0 or self.threads < 0 or self.samples < 0:
            raise ValueError("runs, warmup, threads and samples must be >= 0")
        if self.latency_batch < 1:
            raise ValueError("latency_batch must be at least 1")
        if self.max_latency_ratio is not None and self.runs < 1:
            raise ValueError("max_latency_ratio needs runs >= 1")
        set_limits = [k for k in LIMITS if getattr(self, k) is not None]
        if self.gates == "off" and set_limits:
            raise ValueError(f"gates=off contradicts {set_limits[0]}: drop one of them")

    def limits(self, scored: bool) -> dict[str, float | None]:
        """The gate limits in force: as set, else the defaults (``scored``: the data has labels
        and the model a classifier-like output), none with ``gates=off``."""
        if self.gates == "off":
            return dict.fromkeys(LIMITS)
        given = {k: getattr(self, k) for k in LIMITS}
        if any(v is not None for v in given.values()):
            return given
        default = "max_accuracy_drop" if scored else "min_cosine"
        value = DEFAULT_ACCURACY_DROP if scored else DEFAULT_COSINE
        return {**given, default: value}

    def requires(self, model: onnx.ModelProto, ctx: Context) -> None:
        """The context holds the original model (what the pruned one is compared with)."""
        require_original(ctx, self.name)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Apply rules 1-8; the model is returned unchanged."""
        original = require_original(ctx, self.name)
        data = ctx.eval_data(original)
        if self.samples:
            data = data.head(self.samples)
        check_inputs(original, model)
        # prepacked weights only where latency is timed (they cost a copy of the weights)
        share = False if self.runs else None
        for m in (original, model):  # large weights in memory: written once, read in place
            keep_apart(m, share)
        ref_sess = session(original, ctx.providers, threads=self.threads, share_weights=share)
        new_sess = _pruned_session(model, ctx.providers, self.threads, share)
        if ctx.workers is None:
            ref, new, count = run_pair(ref_sess, new_sess, original, data)
        else:  # --workers: one Ray task per shard of the data, joined in shard order
            ref, new, count = sharded_pair(
                ctx.workers, original, model, data, ctx.providers, self.threads
            )
        labels = data.labels[:count] if data.labels is not None else None
        scored = self._label_output(ref)
        limits = self.limits(labels is not None and scored is not None)
        outputs = [
            compare_output(n, ref[n], new[n], min_cosine=limits["min_cosine"]) for n in ref
        ]  # rule 2
        classification = None  # rule 3
        if scored is not None:
            classification = compare_classification(
                scored, ref[scored], new[scored], labels, limits["max_accuracy_drop"]
            )
        feed = latency_feed(original, data, self.latency_batch)
        cost = cost_section(original, model, symbolic_dims([original, model], feed))  # rule 4
        warnings: list[str] = []
        if labels is not None and classification is None:
            warnings.append("labels ignored: no classifier-like output ([N, C] scores)")
        latency = None
        if self.runs:  # rule 5
            latency = self._latency(
                ref_sess,
                new_sess,
                (feed, data.feed_samples(feed)),
                original,
                model,
                limits["max_latency_ratio"],
            )
            if latency["slower"]:
                warnings.append(slow_message(latency))
        gates = [] if self.gates == "off" else _gates(outputs, classification, latency, limits)
        if self.gates == "off":
            warnings += [
                f"output {o.name!r} has {o.nonfinite} new NaN/Inf values (gates=off: not checked)"
                for o in outputs
                if o.nonfinite
            ]
        diff = None  # rule 7
        if self.layers:
            diff = compare_layers(original, model, data, ctx.providers, self.layer_samples)
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
            "gate_defaults": self.gates == "auto" and all(getattr(self, k) is None for k in LIMITS),
            "passed": all(g["passed"] for g in gates),
            "layers": diff["layers"] if diff else None,
            "layers_skipped": diff["skipped"] if diff else None,
            "layers_samples": diff["samples"] if diff else None,
            "warnings": warnings,
        }
        return PassResult(model, modified=False, report=report)

    def _label_output(self, ref: Mapping[str, np.ndarray]) -> str | None:
        """The output scored by rule 3: ``label_output``, else the first classifier-like one.

        Raises:
            PassOptionError: ``label_output`` is not an output.
            UnsupportedModelError: it is not classifier-like, or ``max_accuracy_drop`` is set
                and no output is.
        """
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
            return name
        name = next((n for n, a in ref.items() if is_classifier_like(a)), None)
        if name is None and self.max_accuracy_drop is not None:
            shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in ref.items())
            raise UnsupportedModelError(
                f"validate: max_accuracy_drop needs a classifier-like output ([N, C] "
                f"scores); the outputs are {shapes}; use min_cosine instead"
            )
        return name

    def _latency(
        self,
        ref_sess: ort.InferenceSession,
        new_sess: ort.InferenceSession,
        timed: tuple[Mapping[str, np.ndarray], int],
        original: onnx.ModelProto,
        model: onnx.ModelProto,
        max_ratio: float | None,
    ) -> dict[str, Any]:
        """Rule 5 on ``timed``: the feed both models run on, and its samples."""
        feed, batch = timed
        cmp = compare_latency(
            runnable(ref_sess, feed),
            runnable(new_sess, feed),
            self.runs,
            self.warmup,
            max_ratio=max_ratio,
        )
        provider = new_sess.get_providers()[0]
        return {
            "provider": provider,
            "threads": self.threads,
            "cpu_count": os.cpu_count(),
            "batch": batch,
            "runs": self.runs,
            "warmup": self.warmup,
            "original": cmp.original.to_dict(),
            "pruned": cmp.pruned.to_dict(),
            "ratio": cmp.ratio,
            "interval": list(cmp.interval) if cmp.interval is not None else None,
            "confidence": CONFIDENCE,
            "slower": (slower := is_slower(cmp)),
            "causes": slow_causes(original, model, provider, cmp) if slower else [],
        }


def _gates(
    outputs: Sequence[OutputComparison],
    classification: ClassificationComparison | None,
    latency: Mapping[str, Any] | None,
    limits: Mapping[str, float | None],
) -> list[dict[str, Any]]:
    """Rule 6: the gates of the limits in force, ``finite`` always."""
    gates = [gate("finite", o.name, o.nonfinite, 0, o.nonfinite == 0) for o in outputs]
    cos = limits["min_cosine"]
    if cos is not None:
        for o in outputs:
            ok = o.cosine == o.cosine and o.cosine >= cos  # NaN fails
            gates.append(gate("min_cosine", o.name, o.to_dict()["cosine"], cos, ok))
    drop = limits["max_accuracy_drop"]
    if drop is not None and classification is not None:
        gates.append(
            gate(
                "max_accuracy_drop",
                classification.output,
                classification.drop,
                drop,
                bool(classification),
            )
        )
    ratio = limits["max_latency_ratio"]
    if ratio is not None and latency is not None:
        low = latency["interval"][0] if latency["interval"] else latency["ratio"]
        g = gate("max_latency_ratio", None, latency["ratio"], ratio, within_limit(low, ratio))
        g["interval"] = latency["interval"]
        gates.append(g)
    return gates


def _pruned_session(
    model: onnx.ModelProto, providers: Sequence[str], threads: int, share: bool | None = False
) -> ort.InferenceSession:
    try:
        return session(model, providers, threads=threads, share_weights=share)
    except PassFailedError as exc:
        raise PassFailedError(f"validate: the pruned model: {exc}") from exc


def with_gates(
    chain: Sequence[Pass], *, always: bool = False, **limits: float | None
) -> list[Pass]:
    """``chain`` with gate ``limits`` set on its last validate pass (appended when missing).

    A validate pass is appended when limits are given, or when ``always`` is true. Limits given
    here win over the pass's own ``gates=off``.

    Raises:
        PassOptionError: a limit out of range.
    """
    given: dict[str, Any] = {k: v for k, v in limits.items() if v is not None}
    if given:
        given["gates"] = "auto"  # a limit on the command line turns a recipe's gates=off back on
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
