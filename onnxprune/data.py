"""Input data for onnxruntime runs: ``--data FILE.npz`` or inputs synthesised from the model.

An .npz holds one array per model input (keyed by the input's name, samples along axis 0) and
optionally ``labels``; a rank-0 input has no samples axis, and every batch gets it whole. Inputs
that do not share that axis are marked (:func:`load_npz`): ``const/NAME`` is one value fed whole
to every batch (a recurrent state, a setting), ``axes/NAME`` a scalar int naming the axis that
holds NAME's samples (a state ``[2, B, H]``: 1). Without a file, :mod:`onnxprune.synthesis`
makes inputs that fit the model.
:attr:`Dataset.synthetic` is the one answer to "is this real data?". How data is cut into
batches for a model is :mod:`onnxprune.runner`'s job.
"""

from __future__ import annotations

import difflib
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.data_checks import AXES, CONST, const_array, input_array, labels_array
from onnxprune.errors import DataError, first_line
from onnxprune.graph import graph_input_names

LABELS = "labels"


@dataclass
class Dataset:
    """Model inputs keyed by name, optional labels, and where they came from.

    An input's samples lie along axis 0, or along ``axes[name]``; an input in ``constants``
    (and any rank-0 input) has no samples axis: every batch gets it whole.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    synthetic: bool = False
    axes: dict[str, int] = field(default_factory=dict)
    constants: frozenset[str] = frozenset()

    def sample_axis(self, name: str) -> int | None:
        """The axis of input ``name`` that holds its samples; None when it is fed whole."""
        value = self.inputs[name]
        first = value[0] if isinstance(value, list) and value else value
        if name in self.constants or not np.ndim(first):
            return None
        return self.axes.get(name, 0)

    def __len__(self) -> int:
        return self.feed_samples(self.inputs)

    def feed_samples(self, feed: Mapping[str, Any]) -> int:
        """Samples in ``feed`` (all of this data or one of its batches): the size of the first
        batched input along its sample axis; 1 when every input is fed whole (0 for none)."""
        for name, value in feed.items():
            axis = self.sample_axis(name) if name in self.inputs else 0
            first = value[0] if isinstance(value, list) and value else value
            if axis is not None and np.ndim(first):
                return int(np.shape(first)[axis])
        return 1 if feed else 0

    def take(self, start: int, stop: int) -> dict[str, Any]:
        """Samples ``start:stop`` of every input (each along its sample axis; constants whole)."""
        out = {}
        for name, value in self.inputs.items():
            axis = self.sample_axis(name)
            out[name] = value if axis is None else take_samples(value, start, stop, axis)
        return out

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds of at most ``size`` samples each, in order."""
        for start in range(0, len(self), size):
            yield self.take(start, start + size)

    def head(self, samples: int) -> Dataset:
        """The first ``samples`` samples (labels too), from the same source."""
        return self.rows(0, samples)

    def rows(self, start: int, stop: int, source: str | None = None) -> Dataset:
        """Samples ``start:stop`` (labels too) as a data set of their own, from ``source``
        (default: the same source)."""
        labels = self.labels[start:stop] if self.labels is not None else None
        return Dataset(
            self.take(start, stop),
            labels,
            self.source if source is None else source,
            self.synthetic,
            self.axes,
            self.constants,
        )


def sample_count(feed: Mapping[str, Any]) -> int:
    """Samples in ``feed``: the length of its first input that has a samples axis (rank-0
    inputs have none; a sequence input counts its first tensor's). For data with constants or
    other sample axes, use :meth:`Dataset.feed_samples`."""
    for v in feed.values():
        first = v[0] if isinstance(v, list) and v else v
        if np.ndim(first):
            return len(first)
    return 1 if feed else 0


def take_samples(value: Any, start: int, stop: int, axis: int = 0) -> Any:
    """Samples ``start:stop`` along ``axis`` of one input's value (a rank-0 input whole; for a
    sequence input, of each of its tensors)."""
    if isinstance(value, list):
        return [take_samples(v, start, stop, axis) for v in value]
    if not np.ndim(value):
        return value
    return value[(slice(None),) * axis + (slice(start, stop),)]


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
        2. Its keys are the model's inputs, each as ``NAME`` (samples along an axis) or
           ``const/NAME`` (fed whole to every batch), ``axes/NAME`` for a batched input whose
           samples are not on axis 0, and, optionally, ``labels``; nothing else (a near miss
           such as ``label`` is named with the key it resembles).
        3. Each input array has the declared rank and fixed sizes (all of them for a
           ``const/`` array, all but the sample axis otherwise) and values the input's dtype
           holds exactly: no strings for a number input, no complex numbers, no NaN or Inf,
           no fractions or out-of-range values for an integer or bool input (float data for a
           float input is cast, e.g. float64 to float32).
        4. ``axes/NAME`` is one integer, an axis of NAME's array (negative counts from the end).
        5. ``labels`` are class indices, one integer >= 0 per sample; one-hot rows are refused
           with the fix (``labels=onehot.argmax(axis=1)``).
        6. Every batched array has the same number of samples along its sample axis, at least
           one (rank-0 and ``const/`` arrays have none).

    Raises:
        DataError: the first rule the file breaks, with what to do.
    """
    path = Path(path)
    arrays = _read_npz(path)
    specs = input_specs(model)
    labels = arrays.pop(LABELS, None)
    given, constants, axes_given = _split_markers(path, arrays)
    _check_keys(path, given, specs, model)
    axes = _sample_axes(path, axes_given, given, constants, specs)
    inputs = {}
    for name, (dims, dtype) in specs.items():
        what = f"{path}: input {name!r}"
        if name in constants:
            inputs[name] = const_array(f"{path}: {CONST}{name}", given[name], dims, dtype)
        else:
            inputs[name] = input_array(what, given[name], dims, dtype, axes.get(name, 0))
    if labels is not None:
        labels = labels_array(f"{path}: {LABELS}", labels)
    _check_counts(path, inputs, labels, axes, constants, specs)
    return Dataset(inputs, labels, str(path), axes=axes, constants=frozenset(constants))


def _split_markers(
    path: Path, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], set[str], dict[str, np.ndarray]]:
    """Rule 2's markers: the input arrays by input name, the constant ones, the ``axes/``."""
    given = {k: v for k, v in arrays.items() if not k.startswith((CONST, AXES))}
    axes = {k[len(AXES) :]: v for k, v in arrays.items() if k.startswith(AXES)}
    constants = set()
    for key, value in arrays.items():
        if not key.startswith(CONST):
            continue
        name = key[len(CONST) :]
        if name in given:
            raise DataError(
                f"{path}: has both {name!r} and {key!r}; give input {name!r} once: with samples "
                f"({name!r}) or fed whole to every batch ({key!r})"
            )
        given[name] = value
        constants.add(name)
    return given, constants, axes


def _sample_axes(
    path: Path,
    axes: dict[str, np.ndarray],
    given: dict[str, np.ndarray],
    constants: set[str],
    specs: dict,
) -> dict[str, int]:
    """Rule 4: each ``axes/NAME`` as an axis of NAME's array (only those other than 0 kept)."""
    out = {}
    for name, value in axes.items():
        key = f"{AXES}{name}"
        if name not in specs:
            raise DataError(
                f"{path}: {key!r} names no input of the model; its inputs are {sorted(specs)}"
                f"{_near_misses([name], list(specs))}"
            )
        if name in constants:
            raise DataError(
                f"{path}: {key!r} gives a sample axis to '{CONST}{name}', which is fed whole "
                f"and has none: drop one of them"
            )
        if value.ndim or value.dtype.kind not in "iu":
            raise DataError(
                f"{path}: {key!r} must be one integer, the axis of {name!r} that holds the "
                f"samples (e.g. np.array(1)), not {value.dtype} {list(value.shape)}"
            )
        rank = given[name].ndim
        axis = int(value)
        if not -rank <= axis < rank:
            shape = list(given[name].shape)
            raise DataError(
                f"{path}: {key!r} = {axis} is no axis of input {name!r} {shape} (rank {rank})"
                + ("; a rank-0 input is fed whole and needs no axis" if not rank else "")
            )
        if axis % rank:
            out[name] = axis % rank
    return out


def _check_counts(
    path: Path,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    axes: dict[str, int],
    constants: set[str],
    specs: dict,
) -> None:
    """Rule 6: one sample count, with the fix when an input looks like a constant."""
    batched = {n: a for n, a in inputs.items() if a.ndim and n not in constants}
    counts = {n: a.shape[axes.get(n, 0)] for n, a in batched.items()}
    if labels is not None:
        counts[LABELS] = len(labels)
    if len(set(counts.values())) <= 1:
        return
    listed = ", ".join(
        f"{k!r} has {n} (shape {list(batched[k].shape)}, axis {axes.get(k, 0)})"
        if k in batched
        else f"{k!r} has {n}"
        for k, n in counts.items()
    )
    most = max(counts.values())
    whole = [n for n, a in batched.items() if counts[n] < most and list(a.shape) == specs[n][0]]
    hint = "".join(
        f"; {n!r} has its declared shape {specs[n][0]}: to feed it whole to every batch, "
        f"key it '{CONST}{n}'"
        for n in whole
    )
    raise DataError(
        f"{path}: arrays have different sample counts ({listed}); every batched array needs "
        f"the same number of samples{hint}; an input that is the same for every sample goes "
        f"under '{CONST}NAME' (fed whole), one with its samples on another axis takes "
        f"'{AXES}NAME' = that axis"
    )


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


def fixed_batch(model: onnx.ModelProto, data: Dataset | None = None) -> int | None:
    """The batch size the model is declared with on the sample axis of every batched input,
    if fixed: axis 0 of each input of rank > 0, or with ``data`` the inputs it batches, each
    on its own sample axis (its constants left out)."""
    sizes = set()
    for name, (dims, _) in input_specs(model).items():
        axis = data.sample_axis(name) if data is not None and name in data.inputs else 0
        if axis is not None and axis < len(dims):
            sizes.add(dims[axis])
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
