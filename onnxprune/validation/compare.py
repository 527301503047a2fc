"""Compare outputs and classifications: small results that are truthy when within tolerance.

Like Polygraphy's comparator results, :class:`OutputComparison` and
:class:`ClassificationComparison` keep their figures, say whether they passed through
``bool(result)``, and print what they measured (and the tolerances that would have passed).

Definitions (``r`` the reference output, ``n`` the new one, element-wise):

* absolute error ``|n - r|``; relative error ``|n - r| / max(|r|, 1e-12)``;
* cosine similarity per sample (axis 0) for outputs of rank 2 or more, averaged over samples
  (``cosine``) and its worst sample (``cosine_min``); a rank-0/1 output is one vector. Two zero
  vectors have cosine 1, a zero and a non-zero vector 0;
* top-1 agreement, for classifier-like outputs (floating point, shape ``[N, C]``, ``C >= 2``):
  the share of samples whose arg-max is the same;
* non-finite: positions where ``n`` is NaN/Inf and ``r`` is not (or is a different NaN/Inf);
  they are left out of every other figure;
* accuracy and macro precision, recall and F1 over the classes found in the labels or the
  predictions (a class never predicted has precision 0; F1 is the mean of per-class F1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from onnxprune.errors import DataError, OutputMismatch
from onnxprune.similarity import cosine_similarity

EPS = 1e-12


def _num(value: float | None) -> float | None:
    """A JSON-safe float: None for None, NaN or Inf."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def is_classifier_like(array: np.ndarray) -> bool:
    """Whether an output looks like class scores: floating point ``[N, C]`` with ``C >= 2``."""
    return array.ndim == 2 and array.shape[1] >= 2 and np.issubdtype(array.dtype, np.floating)


@dataclass
class OutputComparison:
    """How far one output of the new model is from the reference.

    Truthy when it has no new NaN/Inf and meets the tolerances that were set: element-wise
    ``|n - r| <= atol + rtol * |r|`` (when ``atol`` or ``rtol`` is given) and
    ``cosine >= min_cosine`` (when given).
    """

    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    cosine: float
    cosine_min: float
    top1: float | None
    nonfinite: int
    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    close: bool | None = None

    def __bool__(self) -> bool:
        if self.nonfinite:
            return False
        if self.close is False:
            return False
        return self.min_cosine is None or self.cosine >= self.min_cosine

    def __str__(self) -> str:
        top1 = f", top-1 agreement {self.top1:.2%}" if self.top1 is not None else ""
        bad = f", {self.nonfinite} new NaN/Inf" if self.nonfinite else ""
        return (
            f"{self.name} {self.shape}: max abs {self.max_abs:.3g}, mean abs {self.mean_abs:.3g}, "
            f"max rel {self.max_rel:.3g}, mean rel {self.mean_rel:.3g}, cosine {self.cosine:.6f} "
            f"(worst sample {self.cosine_min:.6f}){top1}{bad}; would pass with "
            f"(atol={self.max_abs:.3g}, rtol={self.max_rel:.3g}): "
            f"{'PASSED' if self else 'FAILED'}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (NaN/Inf become null)."""
        out = asdict(self)
        for key in ("max_abs", "mean_abs", "max_rel", "mean_rel", "cosine", "cosine_min", "top1"):
            out[key] = _num(out[key])
        out["passed"] = bool(self)
        return out


def _nonfinite_mask(ref: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions to compare, positions where ``new`` has a NaN/Inf that ``ref`` has not)."""
    fin_r, fin_n = np.isfinite(ref), np.isfinite(new)
    same_special = ~fin_r & ~fin_n & ((np.isnan(ref) & np.isnan(new)) | (ref == new))
    bad = ~fin_n & ~same_special
    return fin_r & fin_n, bad


def compare_output(
    name: str,
    ref: np.ndarray,
    new: np.ndarray,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    min_cosine: float | None = None,
) -> OutputComparison:
    """Compare output ``name`` of the new model (``new``) with the reference (``ref``).

    Raises:
        OutputMismatch: the two arrays have different shapes.
    """
    if ref.shape != new.shape:
        raise OutputMismatch(
            f"validate: output {name!r} changed shape: original {list(ref.shape)}, "
            f"pruned {list(new.shape)}"
        )
    ref64 = np.asarray(ref, dtype=np.float64)
    new64 = np.asarray(new, dtype=np.float64)
    ok, bad = _nonfinite_mask(ref64, new64)
    r, n = np.where(ok, ref64, 0.0), np.where(ok, new64, 0.0)
    diff = np.abs(n - r)
    rel = diff / np.maximum(np.abs(r), EPS)
    count = int(ok.sum())
    rows = len(r) if ref64.ndim >= 2 else 1
    cos = cosine_similarity(r.reshape(rows, -1), n.reshape(rows, -1))
    cos = cos[ok.reshape(rows, -1).any(axis=1)]  # a sample with nothing comparable has no cosine
    close = None
    if atol is not None or rtol is not None:
        limit = (atol or 0.0) + (rtol or 0.0) * np.abs(r)
        close = bool(np.all(diff[ok] <= limit[ok])) and not bad.any()
    top1 = None
    if is_classifier_like(ref):
        top1 = float(np.mean(np.argmax(ref64, axis=1) == np.argmax(new64, axis=1)))
    return OutputComparison(
        name=name,
        shape=list(ref.shape),
        max_abs=float(diff.max()) if count else math.nan,
        mean_abs=float(diff[ok].mean()) if count else math.nan,
        max_rel=float(rel[ok].max()) if count else math.nan,
        mean_rel=float(rel[ok].mean()) if count else math.nan,
        cosine=float(cos.mean()) if cos.size else math.nan,
        cosine_min=float(cos.min()) if cos.size else math.nan,
        top1=top1,
        nonfinite=int(bad.sum()),
        atol=atol,
        rtol=rtol,
        min_cosine=min_cosine,
        close=close,
    )


@dataclass(frozen=True)
class ClassificationScores:
    """Accuracy and macro precision, recall and F1 of one model against labels."""

    samples: int
    accuracy: float
    precision: float
    recall: float
    f1: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return asdict(self)


def labels_to_classes(labels: np.ndarray) -> np.ndarray:
    """Class indices from labels given as indices ``[N]`` (ints or integral floats) or one-hot.

    Raises:
        DataError: labels that are neither.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return np.argmax(labels, axis=1)
    labels = labels.reshape(len(labels), -1)[:, 0] if labels.ndim == 2 else labels
    if labels.ndim != 1:
        raise DataError(
            f"labels must be class indices [N] or one-hot [N, C], not {list(labels.shape)}"
        )
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise DataError(f"labels must be numeric class indices, not {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating) and not np.all(np.mod(labels, 1) == 0):
        raise DataError("labels must be integer class indices (or one-hot rows)")
    return labels.astype(np.int64)


def classification_scores(labels: np.ndarray, predictions: np.ndarray) -> ClassificationScores:
    """Scores of ``predictions`` (class indices) against ``labels`` (class indices)."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    classes = np.union1d(labels, predictions)
    precision, recall, f1 = [], [], []
    for c in classes:
        tp = float(np.sum((predictions == c) & (labels == c)))
        predicted = float(np.sum(predictions == c))
        actual = float(np.sum(labels == c))
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return ClassificationScores(
        samples=len(labels),
        accuracy=float(np.mean(predictions == labels)) if len(labels) else math.nan,
        precision=float(np.mean(precision)) if precision else math.nan,
        recall=float(np.mean(recall)) if recall else math.nan,
        f1=float(np.mean(f1)) if f1 else math.nan,
    )


@dataclass
class ClassificationComparison:
    """Scores of the original and the pruned model; truthy when the accuracy drop is allowed.

    Without labels, the original's own top-1 predictions are the labels: the original then
    scores 1.0 and the pruned model's accuracy is its top-1 agreement.
    """

    output: str
    labelled: bool
    original: ClassificationScores
    pruned: ClassificationScores
    max_drop: float | None = None

    @property
    def drop(self) -> float:
        """Original accuracy minus pruned accuracy (positive = worse)."""
        return self.original.accuracy - self.pruned.accuracy

    def difference(self) -> dict[str, float]:
        """Pruned minus original, per score."""
        a, b = self.original.to_dict(), self.pruned.to_dict()
        return {k: b[k] - a[k] for k in ("accuracy", "precision", "recall", "f1")}

    def __bool__(self) -> bool:
        return self.max_drop is None or self.drop <= self.max_drop + 1e-12

    def __str__(self) -> str:
        basis = "labels" if self.labelled else "the original's predictions"
        o, p = self.original, self.pruned
        return (
            f"{self.output} against {basis} ({o.samples} samples): accuracy {o.accuracy:.4f} -> "
            f"{p.accuracy:.4f} (drop {self.drop:+.4f}), macro F1 {o.f1:.4f} -> {p.f1:.4f}: "
            f"{'PASSED' if self else 'FAILED'}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "output": self.output,
            "labels": self.labelled,
            "original": self.original.to_dict(),
            "pruned": self.pruned.to_dict(),
            "difference": self.difference(),
            "accuracy_drop": self.drop,
        }


def compare_classification(
    output: str,
    ref: np.ndarray,
    new: np.ndarray,
    labels: np.ndarray | None,
    max_drop: float | None = None,
) -> ClassificationComparison:
    """Score both models' arg-max predictions on ``output`` against ``labels``.

    Raises:
        DataError: labels of another length than the outputs, or not class indices.
    """
    ref_pred, new_pred = np.argmax(ref, axis=1), np.argmax(new, axis=1)
    if labels is None:
        truth = ref_pred
    else:
        truth = labels_to_classes(labels)
        if len(truth) != len(ref_pred):
            raise DataError(f"{len(truth)} labels for {len(ref_pred)} samples of output {output!r}")
    return ClassificationComparison(
        output=output,
        labelled=labels is not None,
        original=classification_scores(truth, ref_pred),
        pruned=classification_scores(truth, new_pred),
        max_drop=max_drop,
    )
