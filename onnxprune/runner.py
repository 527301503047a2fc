"""The one way onnxprune runs onnxruntime over data: exposure, batching, retries, outputs.

Rules:
    1. Exposure: intermediate tensors become extra graph outputs (:func:`expose`). A session
       that needs them (:func:`exposed_session`) exposes them on the model itself for the
       time the session is created, so the model is never copied; a large model's weights
       are then read in place (see :func:`onnxprune.runtime.session`).
    2. Batching (:func:`plan`, :func:`batches`): a model declared with a fixed batch size runs
       on batches of exactly that size, and a ragged tail is dropped; any other model runs on
       ``batch_size`` samples (:data:`DEFAULT_BATCH` by default), the last batch possibly
       shorter. ``limit`` keeps only the first samples, ``max_batches`` the first batches.
       Each input is cut along its own sample axis (:class:`onnxprune.data.Dataset`), and a
       fixed batch is read there; constant and rank-0 inputs go whole into every feed.
       Feeds hold the model's inputs only, cast to their declared dtypes.
    3. Retry: when the first batch fails on a model with a dynamic batch (some exports bake
       in batch 1 where the input declares it dynamic), the run restarts one sample at a
       time, with a warning. Any other failure is a :class:`RunFailed`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.data import Dataset, fixed_batch, input_specs
from onnxprune.errors import DataError, RunFailed, first_line
from onnxprune.progress import task
from onnxprune.runtime import CPU, session

log = logging.getLogger(__name__)

DEFAULT_BATCH = 64

Values = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# rule 1: exposure


def expose(model: onnx.ModelProto, names: Sequence[str], *, copy: bool = True) -> onnx.ModelProto:
    """``model`` whose graph also outputs ``names``: a copy, or ``model`` itself (``copy=False``).

    Graph inputs (their values are the feeds) and tensors already output are skipped.
    Intermediate tensors get a ValueInfoProto with just the name; onnxruntime infers type and
    shape. Without a copy the new outputs follow the existing ones, so deleting the outputs
    past the old count undoes it (:func:`exposing` does that).

    Raises:
        ValueError: a name is not a graph input or a tensor produced in the main graph.
    """
    check_tensor_names(model, names)
    exposed = model
    if copy:
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output} | set(input_specs(model))
    for name in dict.fromkeys(names):
        if name not in known:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
            known.add(name)
    return exposed


@contextmanager
def exposing(model: onnx.ModelProto, names: Sequence[str]) -> Iterator[onnx.ModelProto]:
    """``model`` itself with ``names`` exposed inside the ``with`` block, as it was after it.

    Raises:
        ValueError: as :func:`expose`.
    """
    count = len(model.graph.output)
    try:
        yield expose(model, names, copy=False)
    finally:
        del model.graph.output[count:]


def exposed_session(
    model: onnx.ModelProto,
    names: Sequence[str],
    providers: Sequence[str] = (CPU,),
    *,
    threads: int = 0,
    optimize: bool = True,
) -> ort.InferenceSession:
    """A session on ``model`` that also outputs ``names`` (rule 1: no copy of ``model``).

    Raises:
        ValueError: as :func:`expose`.
        PassFailedError: onnxruntime refuses the model.
    """
    with exposing(model, names):
        return session(model, providers, threads=threads, optimize=optimize)


def check_tensor_names(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Check that every name is a real input or a main-graph node output of ``model``.

    Raises:
        ValueError: a name is an initializer, or unknown.
    """
    produced = {out for node in model.graph.node for out in node.output if out}
    known = produced | set(input_specs(model))
    inits = {t.name for t in model.graph.initializer}
    for name in names:
        if name in known:
            continue
        if name in inits:
            raise ValueError(f"{name!r} is an initializer, not an activation")
        raise ValueError(f"{name!r} is not an input or a tensor of the model's main graph")


# --------------------------------------------------------------------------------------------
# rule 2: batching


@dataclass(frozen=True)
class Plan:
    """How the samples of a data set are cut into batches for one model (rule 2).

    Attributes:
        size: samples per batch (the last one may be shorter unless ``fixed``).
        fixed: ``size`` is the model's declared batch size.
        count: number of batches.
        samples: number of samples the batches cover.
    """

    size: int
    fixed: bool
    count: int
    samples: int


def plan(
    model: onnx.ModelProto,
    samples: int | Dataset,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    max_batches: int | None = None,
) -> Plan:
    """The batches ``samples`` samples give for ``model`` (rule 2).

    Args:
        model: the model; its declared fixed batch size, if any, wins over ``batch_size``.
        samples: the data, or the number of samples in it (the fixed batch is then read on
            axis 0 of every input).
        batch_size: samples per batch for a dynamic batch (:data:`DEFAULT_BATCH` when None).
        limit: use at most the first ``limit`` samples.
        max_batches: use at most the first ``max_batches`` batches.

    Raises:
        ValueError: a batch size below 1, or a negative ``limit`` or ``max_batches``.
    """
    if isinstance(samples, Dataset):
        fixed, samples = fixed_batch(model, samples), len(samples)
    else:
        fixed = fixed_batch(model)
    size = fixed or batch_size or DEFAULT_BATCH
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    if (limit is not None and limit < 0) or (max_batches is not None and max_batches < 0):
        raise ValueError("limit and max_batches must be >= 0")
    if limit is not None:
        samples = min(samples, limit)
    count = samples // size if fixed else math.ceil(samples / size)
    if max_batches is not None:
        count = min(count, max_batches)
    return Plan(size, bool(fixed), count, min(samples, count * size))


def batches(
    model: onnx.ModelProto,
    data: Dataset,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    max_batches: int | None = None,
) -> Iterator[Values]:
    """The feeds for ``model`` that ``data`` gives, batch after batch (rule 2; see :func:`plan`).

    Raises:
        DataError: ``data`` lacks an input of the model, or gives no batch.
    """
    yield from _feeds(
        model,
        data,
        plan(model, data, batch_size=batch_size, limit=limit, max_batches=max_batches),
    )


def _feeds(model: onnx.ModelProto, data: Dataset, p: Plan) -> Iterator[Values]:
    """The batches of plan ``p``: the model's inputs only, cast to their declared dtypes."""
    if p.count == 0:
        raise DataError(
            f"{data.source}: {len(data)} sample(s) give no batch for the model (batch size "
            f"{p.size}{', fixed' if p.fixed else ''})"
        )
    dtypes = {name: dtype for name, (_, dtype) in input_specs(model).items()}
    missing = sorted(set(dtypes) - set(data.inputs))
    if missing:
        raise DataError(f"the data has no array for model input(s) {missing}")
    for start in range(0, p.count * p.size, p.size):
        feed = data.take(start, min(start + p.size, p.samples))
        yield {name: _cast(feed[name], dtype) for name, dtype in dtypes.items()}


def _cast(value: Any, dtype: np.dtype) -> Any:
    """One input cast to its declared dtype (each tensor of a sequence input)."""
    if isinstance(value, list):
        return [np.asarray(v, dtype) for v in value]
    return np.asarray(value, dtype)


# --------------------------------------------------------------------------------------------
# rule 3: running, with the per-sample retry


class _RetryPerSample(Exception):
    """The first batch failed on a model with a dynamic batch: run one sample at a time."""


def run_batches(
    sessions: Sequence[ort.InferenceSession],
    model: onnx.ModelProto,
    data: Dataset,
    *,
    fetch: Sequence[str] | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[Values, list[Values]]]:
    """Run every session on the same batches of ``data`` (rules 2 and 3).

    Args:
        sessions: sessions on models that take ``model``'s inputs.
        model: the model the batches are cut for.
        data: the inputs.
        fetch: tensors to fetch from every session (None: each session's outputs).
        batch_size, limit, max_batches: as :func:`plan`.
        progress: report the batches to the progress display (:mod:`onnxprune.progress`).

    Yields:
        Each feed, and per session the fetched values by name. Nothing of a batch is kept
        once the next one runs.

    Raises:
        DataError: ``data`` lacks an input, or gives no batch.
        RunFailed: onnxruntime cannot run a batch (``index`` says which session).
    """
    names = [
        list(fetch) if fetch is not None else [o.name for o in sess.get_outputs()]
        for sess in sessions
    ]
    p = plan(model, data, batch_size=batch_size, limit=limit, max_batches=max_batches)
    try:
        yield from _run(sessions, names, model, data, p, progress)
    except _RetryPerSample as exc:
        log.warning(
            "onnxruntime failed on a batch of %d samples (%s); running one sample at a time",
            p.size,
            exc,
        )
        p = plan(model, data, batch_size=1, limit=limit, max_batches=max_batches)
        yield from _run(sessions, names, model, data, p, progress)


def _no_advance(steps: int = 1) -> None:
    """``advance()`` of a run that reports no progress."""


def _run(
    sessions: Sequence[ort.InferenceSession],
    names: list[list[str]],
    model: onnx.ModelProto,
    data: Dataset,
    p: Plan,
    progress: bool,
) -> Iterator[tuple[Values, list[Values]]]:
    """The batches of plan ``p`` through every session."""
    bar = task(p.count, "batches") if progress else nullcontext(_no_advance)
    with bar as advance:
        for index, feed in enumerate(_feeds(model, data, p)):
            values = []
            for which, (sess, fetch) in enumerate(zip(sessions, names, strict=True)):
                try:
                    values.append(
                        dict(zip(fetch, sess.run(fetch, feed), strict=True)) if fetch else {}
                    )
                except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
                    if index == 0 and p.size > 1 and not p.fixed:
                        raise _RetryPerSample(first_line(exc)) from exc
                    raise RunFailed(which, first_line(exc)) from exc
            yield feed, values
            del feed, values  # the caller is done with this batch: drop it before the next run
            advance()


def stream(
    model: onnx.ModelProto,
    names: Sequence[str],
    data: Dataset,
    providers: Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> Iterator[Values]:
    """The values of ``names`` (graph inputs or main-graph tensors) on ``data``, batch by batch.

    One session runs ``model`` with ``names`` exposed (rule 1); batches and retries follow
    rules 2 and 3; graph inputs come from the feeds.

    Raises:
        ValueError: an unknown tensor name.
        DataError: ``data`` lacks an input, or gives no batch.
        PassFailedError: onnxruntime cannot create the session or run a batch.
    """
    names = list(dict.fromkeys(names))
    inputs = set(input_specs(model))
    fetch = [n for n in names if n not in inputs]
    sess = exposed_session(model, names, providers or (CPU,))
    for feed, (values,) in run_batches(
        [sess],
        model,
        data,
        fetch=fetch,
        batch_size=batch_size,
        limit=limit,
        max_batches=max_batches,
        progress=progress,
    ):
        values.update({n: feed[n] for n in names if n in inputs})
        yield values


def outputs(
    model: onnx.ModelProto,
    data: Dataset,
    providers: Sequence[str] = (CPU,),
    *,
    batch_size: int | None = None,
    limit: int | None = None,
) -> Values:
    """``model``'s outputs on ``data`` (rules 2 and 3), concatenated per output along axis 0.

    Scalar outputs are stacked, one per batch.

    Raises:
        DataError: ``data`` lacks an input, or gives no batch.
        PassFailedError: onnxruntime cannot create the session or run a batch.
    """
    sess = session(model, providers)
    parts: dict[str, list[np.ndarray]] = {o.name: [] for o in sess.get_outputs()}
    for _, (values,) in run_batches([sess], model, data, batch_size=batch_size, limit=limit):
        for name, value in values.items():
            parts[name].append(np.asarray(value))
    return {n: np.concatenate(p) if p[0].ndim else np.stack(p) for n, p in parts.items()}


def run_model(
    model: onnx.ModelProto | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    providers: Sequence[str] = (CPU,),
) -> Values:
    """Run ``model`` once on ``feeds`` exactly as given; returns outputs by name."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model, providers)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def runnable(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
    """One run of ``sess`` on ``feeds`` (every output) as a callable, for timing."""
    feed = dict(feeds)
    return lambda: sess.run(None, feed)
