"""Input data for onnxruntime runs: ``--data FILE.npz`` or inputs synthesised from the model.

An .npz holds one array per model input (keyed by the input's name, samples along axis 0) and
optionally ``labels``; a rank-0 input has no samples axis, and every batch gets it whole.
Without a file, :mod:`onnxprune.synthesis` makes inputs that fit the model.
:attr:`Dataset.synthetic` is the one answer to "is this real data?". How data is cut into
batches for a model is :mod:`onnxprune.runner`'s job.
"""

from __future__ import annotations

import difflib
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import DataError, first_line
from onnxprune.graph import graph_input_names

LABELS = "labels"


@dataclass
class Dataset:
    """Model inputs keyed by name (samples on axis 0), optional labels, and where they came from."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    synthetic: bool = False

    def __len__(self) -> int:
        return sample_count(self.inputs)

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds of at most ``size`` samples each, in order."""
        for start in range(0, len(self), size):
            yield {k: take_samples(v, start, start + size) for k, v in self.inputs.items()}

    def head(self, samples: int) -> Dataset:
        """The first ``samples`` samples (labels too), from the same source."""
        labels = self.labels[:samples] if self.labels is not None else None
        inputs = {k: take_samples(v, 0, samples) for k, v in self.inputs.items()}
        return Dataset(inputs, labels, self.source, self.synthetic)


def sample_count(feed: Mapping[str, Any]) -> int:
    """Samples in ``feed``: the length of its first input that has a samples axis (rank-0
    inputs have none; a sequence input counts its first tensor's)."""
    for v in feed.values():
        first = v[0] if isinstance(v, list) and v else v
        if np.ndim(first):
            return len(first)
    return 1 if feed else 0


def take_samples(value: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of one input's value (a rank-0 input whole; for a sequence input,
    of each of its tensors)."""
    if isinstance(value, list):
        return [take_samples(v, start, stop) for v in value]
    return value[start:stop] if np.ndim(value) else value


def input_specs(model: onnx.ModelProto) -> dict[str, tuple[list[int | str | None], np.dtype]]:
    """Declared shape (ints, dim names or None) and numpy dtype of each real model input (of the
    element, for a sequence or optional input; inputs of other types are left out)."""
    real = set(graph_input_names(model.graph))
    specs = {}
    for vi in model.graph.input:
        if vi.name not in real:
            continue
        _, t = unwrap_type(vi.type)
        if t is None or t.elem_type == onnx.TensorProto.UNDEFINED:
            continue
        specs[vi.name] = (
            declared_dims(t),
            np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)),
        )
    return specs


def load_npz(path: str | os.PathLike[str], model: onnx.ModelProto) -> Dataset:
    """Read the .npz at ``path`` and check it against ``model``'s inputs.

    Rules (a file that breaks one is refused, naming the file and the array):
        1. It is an .npz archive (``np.savez``) of numeric or string arrays: not a single .npy,
           not a pickle, no other members, no object arrays.
        2. Its keys are the model's inputs and, optionally, ``labels``; nothing else (a near
           miss such as ``label`` is named with the key it resembles).
        3. Each input array has the declared rank and fixed sizes (samples along axis 0) and
           values the input's dtype holds exactly: no strings for a number input, no complex
           numbers, no NaN or Inf, no fractions or out-of-range values for an integer or bool
           input (float data for a float input is cast, e.g. float64 to float32).
        4. ``labels`` are class indices, one integer >= 0 per sample; one-hot rows are refused
           with the fix (``labels=onehot.argmax(axis=1)``).
        5. Every array has the same number of samples, at least one.

    Raises:
        DataError: the first rule the file breaks, with what to do.
    """
    path = Path(path)
    arrays = _read_npz(path)
    specs = input_specs(model)
    labels = arrays.pop(LABELS, None)
    _check_keys(path, arrays, specs, model)
    inputs = {
        name: _input_array(f"{path}: input {name!r}", arrays[name], dims, dtype)
        for name, (dims, dtype) in specs.items()
    }
    if labels is not None:
        labels = _labels(f"{path}: {LABELS}", labels)
    counts = {name: len(a) for name, a in inputs.items() if a.ndim}  # rank 0: no samples
    if labels is not None:
        counts[LABELS] = len(labels)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k!r} has {n}" for k, n in counts.items())
        raise DataError(
            f"{path}: arrays have different sample counts ({listed}); axis 0 holds the "
            "samples, and every array needs the same number"
        )
    return Dataset(inputs, labels, str(path))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every member of the archive at ``path``, which must be an .npz of arrays (rule 1)."""
    how = "write one with np.savez(path, input_name=array, ...)"
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an .npz data file")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a numpy .npz archive ({first_line(exc)}); {how}") from exc
    if isinstance(npz, np.ndarray):
        raise DataError(f"{path}: holds one .npy array, not an .npz archive of named ones; {how}")
    arrays = {}
    with npz:
        for key in npz.files:
            try:
                value = npz[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                fix = "; save numbers or strings" if "pickle" in str(exc) else ""
                raise DataError(
                    f"{path}: array {key!r} cannot be read ({first_line(exc)}){fix}"
                ) from exc
            if not isinstance(value, np.ndarray):
                raise DataError(
                    f"{path}: member {key!r} is not a numpy array; an .npz holds only arrays "
                    f"({how})"
                )
            arrays[key] = value
    return arrays


def _check_keys(
    path: Path, arrays: dict[str, np.ndarray], specs: dict, model: onnx.ModelProto
) -> None:
    """Rule 2: an array for every input, and none that is no input."""
    missing = sorted(set(specs) - set(arrays))
    extra = sorted(set(arrays) - set(specs))
    if missing:
        raise DataError(
            f"{path}: no array for model input(s) {missing}; the file has {sorted(arrays)}"
            f"{_near_misses(extra, missing, named=True)}; key each array by the model's "
            "input name"
        )
    if extra:
        weights = sorted(set(extra) & {t.name for t in model.graph.initializer})
        note = f"; {weights} are weights of the model, not inputs" if weights else ""
        raise DataError(
            f"{path}: array(s) {extra} are no input of the model"
            f"{_near_misses(extra, [*specs, LABELS])}{note}; its inputs are {sorted(specs)}, "
            f"plus optional {LABELS!r}: rename or remove the others"
        )


def _near_misses(keys: list[str], names: list[str], *, named: bool = False) -> str:
    """`` (did you mean 'labels'?)`` for the keys that resemble one of ``names`` (``named``,
    or several keys: `` (did you mean 'labels' for 'label'?)``)."""
    guesses = []
    for key in keys:
        same_case = [n for n in names if n.lower() == key.lower()]
        close = same_case or difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        if close:
            guesses.append((key, close[0]))
    if not guesses:
        return ""
    if len(keys) == 1 and not named:
        return f" (did you mean {guesses[0][1]!r}?)"
    return " (did you mean " + ", ".join(f"{n!r} for {k!r}" for k, n in guesses) + "?)"


def _input_array(
    what: str, arr: np.ndarray, dims: list[int | str | None], dtype: np.dtype
) -> np.ndarray:
    """Rule 3 for one input (``what`` names the file and the input); the array, cast."""
    if arr.ndim == 0:
        if dims == []:  # a rank-0 input: one value for every sample
            return _cast(what, arr, np.dtype(dtype))
        raise DataError(f"{what} is a single value; samples go along axis 0 (shape [N, ...])")
    wrong_rank = bool(dims) and arr.ndim != len(dims)
    fixed = [] if wrong_rank else list(zip(arr.shape[1:], dims[1:], strict=False))
    if wrong_rank or any(isinstance(d, int) and d > 0 and got != d for got, d in fixed):
        raise DataError(
            f"{what} has shape {list(arr.shape)}, the model declares {dims} (samples go "
            "along axis 0)"
        )
    if not len(arr):
        raise DataError(f"{what} has no samples (shape {list(arr.shape)})")
    return _cast(what, arr, np.dtype(dtype))


def _cast(what: str, arr: np.ndarray, want: np.dtype) -> np.ndarray:
    """``arr`` as ``want``, refusing what the cast would change silently (rule 3)."""
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
    _require_finite(what, arr)
    if arr.dtype == want:
        return arr
    with np.errstate(all="ignore"):  # overflow is checked below
        cast = arr.astype(want)
    if want.kind == "f":
        if not np.isfinite(cast).all():
            raise DataError(
                f"{what} has values beyond the range of {want} (magnitude at most "
                f"{np.finfo(want).max:g})"
            )
        return cast
    changed = cast != arr
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
    return cast


def _require_finite(what: str, arr: np.ndarray) -> None:
    """No NaN or infinity in a float array (samples along axis 0)."""
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(arr), -1).any(axis=1))[0])
        raise DataError(
            f"{what} has {int(bad.sum())} NaN or infinite value(s), the first in sample "
            f"{first}; data must be finite: drop or fix those samples"
        )


def _labels(what: str, labels: np.ndarray) -> np.ndarray:
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
        _require_finite(what, labels)
    integral = kind in "biu" or (kind == "f" and bool(np.all(labels == np.round(labels))))
    if not integral:
        raise DataError(
            f"{what} must be class indices (integers >= 0), not {labels.dtype} values"
            + ("; map class names to indices" if kind in "US" else "")
        )
    if kind != "b" and len(labels) and labels.min() < 0:
        raise DataError(f"{what} must be class indices >= 0, not {labels.min().item()!r}")
    return labels.astype(np.int64)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model is declared with on axis 0 of every input, if fixed."""
    sizes = {dims[0] for dims, _ in input_specs(model).values() if dims}
    if len(sizes) == 1:
        (size,) = sizes
        return size if isinstance(size, int) and size > 0 else None
    return None


def unwrap_type(tp: onnx.TypeProto) -> tuple[str, onnx.TypeProto.Tensor | None]:
    """(``tensor``, ``sequence``, ``optional`` or another kind; the tensor type inside, if any)."""
    kind = tp.WhichOneof("value") or "untyped"
    if kind == "tensor_type":
        return "tensor", tp.tensor_type
    if kind in ("sequence_type", "optional_type"):
        inner = getattr(tp, kind).elem_type
        if inner.WhichOneof("value") == "tensor_type":
            return kind.split("_")[0], inner.tensor_type
    return kind.removesuffix("_type"), None


def declared_dims(t: onnx.TypeProto.Tensor) -> list[int | str | None]:
    """Each declared dim: its size, its name, or None."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
