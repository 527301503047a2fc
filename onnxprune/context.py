"""What the passes of one run share: the original model, data, providers, seed, caches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxprune.data import Dataset
from onnxprune.distributed import Workers
from onnxprune.errors import InternalError
from onnxprune.runtime import CPU
from onnxprune.synthesis import load_data


@dataclass
class Context:
    """Shared state of a pass chain.

    Attributes:
        original: the model as loaded, before any pass (validate compares against it); None
            when the pipeline ran in place and no pass declared ``needs_original``.
        data_path: calibration / test data (.npz), or None to synthesise inputs.
        eval_data_path: data validate compares the models on (.npz), or None to use the
            run's data (``data_path``, else synthetic).
        providers: onnxruntime providers to use, best first.
        seed: seed for anything random (synthetic data, random criteria).
        model_path: where the model came from, for messages.
        cache: results computed once and shared by passes (activation statistics...).
        input_shapes: input name -> the shape the user fixed (``--input-shape``): synthetic
            inputs and costs use it.
        workers: Ray tasks that calibration and validate's evaluation run on, one shard of
            the data each (``--workers``); None runs them in this process.
    """

    original: onnx.ModelProto | None
    data_path: Path | None = None
    providers: list[str] = field(default_factory=lambda: [CPU])
    seed: int = 0
    model_path: Path | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    eval_data_path: Path | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    workers: Workers | None = None
    _data: Dataset | None = None
    _eval_data: Dataset | None = None

    def data(self, model: onnx.ModelProto | None = None) -> Dataset:
        """The run's data set, one for every pass: read by :func:`onnxprune.synthesis.load_data` on
        first use, against ``model`` (``original`` when None; passes keep its inputs).

        Its ``synthetic`` flag says whether the data is real (``data_path``) or synthesised.

        Raises:
            DataError: as :func:`onnxprune.synthesis.load_data`.
        """
        if self._data is None:
            target = model if model is not None else self.original
            if target is None:
                raise InternalError("Context.data() needs a model when ctx.original is None")
            self._data = load_data(
                self.data_path, target, seed=self.seed, input_shapes=self.input_shapes
            )
        return self._data

    def eval_data(self, model: onnx.ModelProto | None = None) -> Dataset:
        """The data validate compares on: ``eval_data_path`` read (once, against ``model``, as
        :meth:`data`) when set, else the run's data set (:meth:`data`).

        Raises:
            DataError: as :func:`onnxprune.synthesis.load_data`.
        """
        if self.eval_data_path is None:
            return self.data(model)
        if self._eval_data is None:
            target = model if model is not None else self.original
            if target is None:
                raise InternalError("Context.eval_data() needs a model when ctx.original is None")
            self._eval_data = load_data(self.eval_data_path, target, seed=self.seed)
        return self._eval_data
