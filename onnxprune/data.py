"""Input data for onnxruntime runs: ``--data FILE.npz`` or inputs synthesised from the model.

An .npz holds one array per model input (keyed by the input's name, samples along axis 0) and
optionally ``labels``. Without one, :data:`SYNTH_SAMPLES` inputs are synthesised from the
declared shapes and dtypes: axis 0 holds the samples, and other symbolic dimensions become
:data:`SYNTH_DIM`. :attr:`Dataset.synthetic` is the one answer to "is this real
data?". How data is cut into batches for a model is :mod:`onnxprune.runner`'s job.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import DataError
from onnxprune.graph import graph_input_names

SYNTH_DIM = 16
SYNTH_SAMPLES = 32
LABELS = "labels"


@dataclass
class Dataset:
    """Model inputs keyed by name (samples on axis 0), optional labels, and where they came from."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    synthetic: bool = False

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds of at most ``size`` samples each, in order."""
        for start in range(0, len(self), size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}

    def head(self, samples: int) -> Dataset:
        """The first ``samples`` samples (labels too), from the same source."""
        labels = self.labels[:samples] if self.labels is not None else None
        inputs = {k: v[:samples] for k, v in self.inputs.items()}
        return Dataset(inputs, labels, self.source, self.synthetic)


def load_data(
    path: str | os.PathLike[str] | None,
    model: onnx.ModelProto,
    *,
    samples: int = SYNTH_SAMPLES,
    seed: int = 0,
) -> Dataset:
    """The .npz at ``path`` checked against ``model`` (:func:`load_npz`), or, when ``path`` is
    None, ``samples`` inputs synthesised from ``model`` with ``seed`` (:func:`synthesize`).

    Raises:
        DataError: as :func:`load_npz`, or an input dtype that cannot be synthesised.
    """
    if path is not None:
        return load_npz(path, model)
    return synthesize(model, samples, seed)


def input_specs(model: onnx.ModelProto) -> dict[str, tuple[list[int | str | None], np.dtype]]:
    """Declared shape (ints, dim names or None) and numpy dtype of each real model input."""
    real = set(graph_input_names(model.graph))
    specs = {}
    for vi in model.graph.input:
        if vi.name not in real:
            continue
        t = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        ]
        specs[vi.name] = (dims, dtype)
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
    lengths = {len(v) for v in inputs.values()} | ({len(labels)} if labels is not None else set())
    if len(lengths) > 1:
        raise DataError(f"{path}: arrays have different sample counts {sorted(lengths)}")
    return Dataset(inputs, labels, str(path))


def synthesize(model: onnx.ModelProto, samples: int = 8, seed: int = 0) -> Dataset:
    """Random inputs from the declared shapes: floats ~ N(0, 1), integers in [0, 10), bools."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, (dims, dtype) in input_specs(model).items():
        shape = [
            samples if i == 0 else (d if isinstance(d, int) and d > 0 else SYNTH_DIM)
            for i, d in enumerate(dims)
        ]
        if not dims:
            shape = []
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            arr = rng.integers(0, 2, shape).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            arr = rng.integers(0, 10, shape).astype(dtype)
        else:
            raise DataError(f"input {name!r}: cannot synthesise dtype {dtype}; pass --data")
        inputs[name] = arr
    return Dataset(inputs, None, "synthetic", synthetic=True)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model is declared with on axis 0 of every input, if fixed."""
    sizes = {dims[0] for dims, _ in input_specs(model).values() if dims}
    if len(sizes) == 1:
        (size,) = sizes
        return size if isinstance(size, int) and size > 0 else None
    return None
