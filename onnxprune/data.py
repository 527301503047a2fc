"""Input data for onnxruntime runs: ``--data FILE.npz`` or inputs synthesised from the model.

An .npz holds one array per model input (keyed by the input's name, samples along axis 0) and
optionally ``labels``. Without one, inputs are synthesised from the declared shapes and dtypes
(:func:`synthesize`). A rank-0 input has no samples axis: every batch gets it whole.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import DataError, PassFailedError
from onnxprune.graph import graph_input_names
from onnxprune.input_hints import InputHints, input_hints
from onnxprune.runtime import run_model, session

SYNTH_DIM = 16
SEQUENCE_LENGTH = 2
INT_HIGH = 10
LABELS = "labels"
_WORDS = ("the", "a", "model", "input", "text", "value", "zero", "one")
_FLOATS = frozenset(
    (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    )
)
_SYNTHESISABLE = _FLOATS | {
    onnx.TensorProto.BOOL,
    onnx.TensorProto.STRING,
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


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
        _, t = _unwrap(vi.type)
        if t is None or t.elem_type == onnx.TensorProto.UNDEFINED:
            continue
        specs[vi.name] = (_dims(t), np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)))
    return specs


def load_npz(path: str | os.PathLike[str], model: onnx.ModelProto) -> Dataset:
    """Read ``path`` and check it against the model's inputs (names, ranks, dtypes castable).

    Raises:
        DataError: missing file, not an .npz, missing or unexpected inputs, mismatched lengths.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a numpy .npz archive ({exc})") from exc
    specs = input_specs(model)
    labels = arrays.pop(LABELS, None)
    missing = sorted(set(specs) - set(arrays))
    if missing:
        raise DataError(
            f"{path}: no array for model input(s) {missing}; the file has {sorted(arrays)} "
            f"(key each array by the model's input name)"
        )
    inputs = {}
    for name, (dims, dtype) in specs.items():
        arr = arrays[name]
        if dims and arr.ndim != len(dims):
            raise DataError(
                f"{path}: input {name!r} has shape {list(arr.shape)}, the model declares "
                f"{dims} (samples go along axis 0)"
            )
        inputs[name] = arr.astype(dtype, copy=False)
    lengths = {len(v) for v in inputs.values() if v.ndim}  # a rank-0 input has no samples
    lengths |= {len(labels)} if labels is not None else set()
    if len(lengths) > 1:
        raise DataError(f"{path}: arrays have different sample counts {sorted(lengths)}")
    return Dataset(inputs, labels, str(path))


def synthesize(model: onnx.ModelProto, samples: int = 8, seed: int = 0) -> Dataset:
    """Random inputs that fit the model: floats ~ N(0, 1), integers in [0, 10) (and below the
    size of a table they index), bools, strings (from a consumer's vocabulary, if it has one);
    a sequence input holds :data:`SEQUENCE_LENGTH` such tensors, an optional input one.

    Sizes: ``samples`` on axis 0 (a model with a fixed batch is fed slices of it); fixed dims
    as declared; a symbolic one what the graph needs (:mod:`onnxprune.input_hints`), else
    :data:`SYNTH_DIM`, or 1 when onnxruntime rejects :data:`SYNTH_DIM` (one trial run on one
    batch, made only when such dims exist).

    Raises:
        DataError: an input of a type that cannot be synthesised, or symbolic dims that no
            trial size fits; the message names the input and says to pass --data.
    """
    plan = _SynthesisPlan.make(model)
    fill = _fitting_fill(model, plan, seed) if plan.free else SYNTH_DIM
    return Dataset(plan.inputs(samples, seed, fill), None, "synthetic", synthetic=True)


@dataclass
class _SynthesisPlan:
    """The real inputs' types, declared dims and what the graph tells about them."""

    types: dict[str, tuple[str, int, list[int | str | None]]]  # name -> (kind, elem type, dims)
    hints: InputHints
    named: dict[str, int]  # dim name -> size the graph needs
    free: dict[str, list[str]]  # input -> its symbolic dims nothing determines

    @classmethod
    def make(cls, model: onnx.ModelProto) -> _SynthesisPlan:
        """Read the inputs; raise DataError for one whose type cannot be synthesised."""
        types = {}
        real = set(graph_input_names(model.graph))
        for vi in model.graph.input:
            if vi.name not in real:
                continue
            kind, tensor = _unwrap(vi.type)
            if tensor is None or tensor.elem_type not in _SYNTHESISABLE:
                what = kind if tensor is None else onnx.TensorProto.DataType.Name(tensor.elem_type)
                raise DataError(f"input {vi.name!r}: cannot synthesise a {what} value; pass --data")
            types[vi.name] = (kind, tensor.elem_type, _dims(tensor))
        hints = input_hints(model, {n: len(d) for n, (_, _, d) in types.items()})
        named: dict[str, int] = {}
        for name, (_, _, dims) in types.items():
            for axis, size in hints.dims.get(name, {}).items():
                if axis and isinstance(dims[axis], str):
                    named.setdefault(dims[axis], size)
        free = {}
        for name, (_, _, dims) in types.items():
            open_dims = [
                str(d)
                for axis, d in enumerate(dims)
                if axis
                and not (isinstance(d, int) and d > 0)
                and axis not in hints.dims.get(name, {})
                and d not in named
            ]
            if open_dims:
                free[name] = open_dims
        return cls(types, hints, named, free)

    def shape(self, name: str, samples: int, fill: int) -> list[int]:
        """The synthetic shape of input ``name``."""
        dims = self.types[name][2]
        given = self.hints.dims.get(name, {})
        out = []
        for axis, d in enumerate(dims):
            if axis == 0:
                out.append(samples)  # the samples axis, even where the batch is fixed
            elif isinstance(d, int) and d > 0:
                out.append(d)
            else:
                out.append(given.get(axis) or self.named.get(d or "", fill))
        return out

    def inputs(self, samples: int, seed: int, fill: int) -> dict[str, Any]:
        """One random value per input (a list of tensors for a sequence input)."""
        rng = np.random.default_rng(seed)
        out: dict[str, Any] = {}
        for name, (kind, elem, _) in self.types.items():
            shape = self.shape(name, samples, fill)
            count = SEQUENCE_LENGTH if kind == "sequence" else 1
            values = [self._random(rng, name, elem, shape) for _ in range(count)]
            out[name] = values if kind == "sequence" else values[0]
        return out

    def _random(self, rng: np.random.Generator, name: str, elem: int, shape: list[int]) -> Any:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        if elem in _FLOATS:
            return rng.standard_normal(shape).astype(dtype)
        if elem == onnx.TensorProto.BOOL:
            return rng.integers(0, 2, shape).astype(bool)
        if elem == onnx.TensorProto.STRING:
            words = self.hints.strings.get(name) or _WORDS
            return np.array(words, dtype=object)[rng.integers(0, len(words), shape)]
        high = min(INT_HIGH, self.hints.int_high.get(name, INT_HIGH))
        return rng.integers(0, max(high, 1), shape).astype(dtype)


def _fitting_fill(model: onnx.ModelProto, plan: _SynthesisPlan, seed: int) -> int:
    """:data:`SYNTH_DIM` for the dims nothing determines, or 1 if only that runs.

    A model onnxruntime cannot load at all is not a matter of sizes: :data:`SYNTH_DIM` then,
    and the caller reports onnxruntime's error when it runs the model itself.
    """
    try:
        sess = session(model, optimize=False)
    except PassFailedError:
        return SYNTH_DIM
    error = ""
    samples = fixed_batch(model) or 1
    for fill in dict.fromkeys((SYNTH_DIM, 1)):
        try:
            run_model(sess, plan.inputs(samples, seed, fill))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
            error = error or _reason(exc)
            continue
        return fill
    which = ", ".join(f"{n!r} (dims {d})" for n, d in plan.free.items())
    raise DataError(
        f"input {which}: synthetic values do not fit the model with those dims set to "
        f"{SYNTH_DIM} or 1 (onnxruntime: {error}); pass --data with real inputs"
    )


def _reason(exc: Exception, limit: int = 200) -> str:
    """onnxruntime's message in short, on one line: the node it failed on and why."""
    text = " ".join(str(exc).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    text = text.rsplit("Status Message: ", 1)[-1]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"\S+\.(h|cc|cpp):\d+ ", "", text)  # source file and line
    text = re.sub(r"onnxruntime::[\w:]+\([^)]*\) ", "", text)  # the C++ function
    if node:
        text = f"{' '.join(n for n in (node[1], node[2]) if n)}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unwrap(tp: onnx.TypeProto) -> tuple[str, onnx.TypeProto.Tensor | None]:
    """(``tensor``, ``sequence``, ``optional`` or another kind; the tensor type inside, if any)."""
    kind = tp.WhichOneof("value") or "untyped"
    if kind == "tensor_type":
        return "tensor", tp.tensor_type
    if kind in ("sequence_type", "optional_type"):
        inner = getattr(tp, kind).elem_type
        if inner.WhichOneof("value") == "tensor_type":
            return kind.split("_")[0], inner.tensor_type
    return kind.removesuffix("_type"), None


def _dims(t: onnx.TypeProto.Tensor) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model is declared with on axis 0 of every input, if fixed."""
    sizes = {dims[0] for dims, _ in input_specs(model).values() if dims}
    if len(sizes) == 1:
        (size,) = sizes
        return size if isinstance(size, int) and size > 0 else None
    return None


def feeds_for(
    model: onnx.ModelProto, data: Dataset, limit: int | None = None
) -> Iterator[Mapping[str, np.ndarray]]:
    """Batches of ``data`` sized for the model: per sample when its batch is fixed to 1."""
    fixed = fixed_batch(model)
    batch = fixed or 64
    count = 0
    for feed in data.batches(batch):
        if limit is not None and count >= limit:
            return
        n = sample_count(feed)
        if fixed and n != batch:
            return  # a fixed-batch model cannot take the ragged tail
        count += n
        yield feed
