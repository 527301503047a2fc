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

from onnxprune.errors import (
    PassFailedError,
    PassOptionError,
    UnsupportedModelError,
)
from onnxprune.passes.base import Pass, PassResult, option, require_original
from onnxprune.passes.registry import register_pass
from onnxprune.runner import runnable
from onnxprune.runtime import session
from onnxprune.validation.compare import (
    ClassificationComparison,
    OutputComparison,
    compare_classification,
    compare_output,
    is_classifier_like,
)
from onnxprune.validation.gates import gate
from onnxprune.validation.latency import compare_latency
from onnxprune.validation.pair import (
    check_inputs,
    cost_section,
    latency_feed,
    run_pair,
    symbolic_dims,
)
from onnxprune.validation.slow import is_slower, slow_causes, slow_message

if TYPE_CHECKING:
    from onnxprune.context import Context


@register_pass
@dataclass
class Validate(Pass):
    """Compare with the original model: outputs, accuracy, cost, latency; record the gates.

    Rules:
        1. Both models run on the context's data (``--data``, else inputs synthesised from the
           original's declared shapes), batch by batch, at most ``samples`` samples.
        2. Every output of the original is compared (``compare.compare_output``): max and mean
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
    max_accuracy_drop: float | None = option(
        None, "gate: largest allowed accuracy drop (0-1)", low=0, high=1
    )
    min_cosine: float | None = option(
        None, "gate: smallest allowed mean cosine of each output", low=-1, high=1
    )
    max_latency_ratio: float | None = option(
        None, "gate: largest allowed pruned/original median latency", above=0
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
            data = data.head(self.samples)
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
        cmp = compare_latency(
            runnable(ref_sess, feed),
            runnable(new_sess, feed),
            self.runs,
            self.warmup,
            max_ratio=self.max_latency_ratio,
        )
        provider = new_sess.get_providers()[0]
        return {
            "provider": provider,
            "threads": self.threads,
            "cpu_count": os.cpu_count(),
            "batch": len(next(iter(feed.values()))) if feed else 0,
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
        gates = [gate("finite", o.name, o.nonfinite, 0, o.nonfinite == 0) for o in outputs]
        if self.min_cosine is not None:
            for o in outputs:
                ok = o.cosine == o.cosine and o.cosine >= self.min_cosine  # NaN fails
                gates.append(gate("min_cosine", o.name, o.to_dict()["cosine"], self.min_cosine, ok))
        if self.max_accuracy_drop is not None and classification is not None:
            gates.append(
                gate(
                    "max_accuracy_drop",
                    classification.output,
                    classification.drop,
                    self.max_accuracy_drop,
                    bool(classification),
                )
            )
        if self.max_latency_ratio is not None and latency is not None:
            gates.append(
                gate(
                    "max_latency_ratio",
                    None,
                    latency["ratio"],
                    self.max_latency_ratio,
                    latency["ratio"] <= self.max_latency_ratio,
                )
            )
        return gates


def _pruned_session(
    model: onnx.ModelProto, providers: Sequence[str], threads: int
) -> ort.InferenceSession:
    try:
        return session(model, providers, threads=threads, share_weights=False)
    except PassFailedError as exc:
        raise PassFailedError(f"validate: the pruned model: {exc}") from exc


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
