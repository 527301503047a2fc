"""Checks of one array of a data file against the model input it feeds: shape, values, labels.

The rules are those of :func:`onnxprune.data.load_npz` (3, 5); each check names the file and
the array in ``what`` and returns the array cast to the input's dtype.
"""

from __future__ import annotations

import numpy as np

from onnxprune.errors import DataError

CONST = "const/"  # key prefix of an input fed whole to every batch
AXES = "axes/"  # key prefix of the axis that holds an input's samples


def input_array(
    what: str, arr: np.ndarray, dims: list[int | str | None], dtype: np.dtype, axis: int = 0
) -> np.ndarray:
    """Rule 3 for one batched input (``what`` names the file and the input; samples along
    ``axis``); the array, cast."""
    if arr.ndim == 0:
        if dims == []:  # a rank-0 input: one value for every sample
            return cast(what, arr, np.dtype(dtype))
        raise DataError(
            f"{what} is a single value; the model declares {dims}: samples go along axis 0 "
            "(shape [N, ...])"
        )
    wrong_rank = bool(dims) and arr.ndim != len(dims)
    pairs = [] if wrong_rank else list(zip(arr.shape, dims, strict=False))
    fixed = [pair for i, pair in enumerate(pairs) if i != axis]
    if wrong_rank or any(isinstance(d, int) and d > 0 and got != d for got, d in fixed):
        where = f"axis {axis}" if axis else "axis 0"
        raise DataError(
            f"{what} has shape {list(arr.shape)}, the model declares {dims} (samples go "
            f"along {where}; an input the same for every sample is keyed '{CONST}NAME' and "
            f"fed whole, one with samples on another axis needs '{AXES}NAME')"
        )
    if not arr.shape[axis]:
        raise DataError(f"{what} has no samples (shape {list(arr.shape)}, samples on axis {axis})")
    return cast(what, arr, np.dtype(dtype), axis)


def const_array(
    what: str, arr: np.ndarray, dims: list[int | str | None], dtype: np.dtype
) -> np.ndarray:
    """Rule 3 for a ``const/`` input (``what`` names the file and the key): the declared rank
    and every fixed size, since it is fed as it is; the array, cast."""
    wrong_rank = bool(dims) and arr.ndim != len(dims)
    if wrong_rank or any(
        isinstance(d, int) and d > 0 and got != d for got, d in zip(arr.shape, dims, strict=False)
    ):
        raise DataError(
            f"{what} has shape {list(arr.shape)}, the model declares {dims}; a const/ array "
            "is fed whole to every batch, so it needs the declared shape"
        )
    return cast(what, arr, np.dtype(dtype), None)


def cast(what: str, arr: np.ndarray, want: np.dtype, axis: int | None = 0) -> np.ndarray:
    """``arr`` as ``want``, refusing what the cast would change silently (rule 3; samples
    along ``axis``, None: a constant)."""
    kind = arr.dtype.kind
    if want.kind in "OUS":  # a string input
        if kind not in "US":
            raise DataError(f"{what} holds {arr.dtype} values; the model input takes strings")
        return arr.astype(want)
    if kind in "US":
        raise DataError(f"{what} holds strings ({arr.dtype}); the model input takes {want} numbers")
    if kind == "c":
        raise DataError(
            f"{what} holds complex numbers ({arr.dtype}); the model input takes real {want} values"
        )
    if kind not in "biuf":
        raise DataError(f"{what} has dtype {arr.dtype}, not numbers; the model input takes {want}")
    require_finite(what, arr, axis)
    if arr.dtype == want:
        return arr
    with np.errstate(all="ignore"):  # overflow is checked below
        out = arr.astype(want)
    if want.kind == "f":
        if not np.isfinite(out).all():
            raise DataError(
                f"{what} has values beyond the range of {want} (magnitude at most "
                f"{np.finfo(want).max:g})"
            )
        return out
    changed = out != arr
    if changed.any():
        example = arr[changed].flat[0].item()
        allowed = (
            "0 or 1 (or booleans)"
            if want.kind == "b"
            else f"integers in [{np.iinfo(want).min}, {np.iinfo(want).max}]"
        )
        raise DataError(
            f"{what} has values that change when cast to {want} (e.g. {example!r}); give {allowed}"
        )
    return out


def require_finite(what: str, arr: np.ndarray, axis: int | None = 0) -> None:
    """No NaN or infinity in a float array (samples along ``axis``; None or rank 0: none)."""
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if not bad.any():
        return
    where = "; data must be finite: fix those values"
    if axis is not None and arr.ndim:
        rows = np.moveaxis(bad, axis, 0).reshape(arr.shape[axis], -1).any(axis=1)
        where = f", the first in sample {int(np.flatnonzero(rows)[0])}; data must be finite: "
        where += "drop or fix those samples"
    raise DataError(f"{what} has {int(bad.sum())} NaN or infinite value(s){where}")


def labels_array(what: str, labels: np.ndarray) -> np.ndarray:
    """Rule 4: class indices, one integer >= 0 per sample, as int64."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{what} have shape {list(labels.shape)}, a row of {labels.shape[1]} values per "
            "sample (one-hot or scores); give one class index per sample, e.g. "
            "labels=onehot.argmax(axis=1)"
        )
    if labels.ndim != 1:
        hint = ", e.g. labels.reshape(-1)" if labels.ndim and labels.size == len(labels) else ""
        raise DataError(
            f"{what} have shape {list(labels.shape)}; give one class index per sample "
            f"(shape [N]){hint}"
        )
    kind = labels.dtype.kind
    if kind == "f":
        require_finite(what, labels)
    integral = kind in "biu" or (kind == "f" and bool(np.all(labels == np.round(labels))))
    if not integral:
        raise DataError(
            f"{what} must be class indices (integers >= 0), not {labels.dtype} values"
            + ("; map class names to indices" if kind in "US" else "")
        )
    if kind != "b" and len(labels) and labels.min() < 0:
        raise DataError(f"{what} must be class indices >= 0, not {labels.min().item()!r}")
    return labels.astype(np.int64)
