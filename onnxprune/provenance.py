"""What a report records so that CI can act on it and anyone can audit or repeat the run.

Rules:
    1. ``status`` is the run's verdict in one word, from the same gates as the final line
       (:func:`onnxprune.validation.gates.verdict`): ``failed`` when a gate failed (FAILED),
       ``passed`` when gates were checked and all held (PASSED), else ``no gates`` (DONE).
    2. ``gates`` lists every gate checked, in chain order, as ``{name, output, value, limit,
       passed}`` (the validate sections hold the details).
    3. ``versions`` names onnxprune, onnx, onnxruntime, numpy and Python; ``seed``, ``device``
       (as asked) and ``argv`` (the command line; None through the Python API) say how to
       repeat the run.
    4. ``files`` holds the SHA-256 of the files read and written: ``model`` (the model file
       and its external data), ``data`` (``--data``), ``output`` (the model written and its
       external data), each ``[{path, bytes, sha256}]``. A file is hashed once per version
       (path, size and modification time), so a sweep does not hash its input again per point.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from onnxprune.model import model_data_files
from onnxprune.validation.gates import checked_gates, failed_gates
from onnxprune.version import __version__

PASSED, FAILED, NO_GATES = "passed", "failed", "no gates"
GATE_KEYS = ("name", "output", "value", "limit", "passed")
_CHUNK = 1 << 20


def status(report: Mapping[str, Any]) -> str:
    """Rule 1: ``passed``, ``failed`` or ``no gates`` (a run report's, or a sweep point's)."""
    if failed_gates(report):
        return FAILED
    return PASSED if checked_gates(report) else NO_GATES


def gate_summary(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rule 2: every gate checked, its five keys only."""
    return [{k: g.get(k) for k in GATE_KEYS} for g in checked_gates(report)]


def versions() -> dict[str, str]:
    """Rule 3: the versions that made the report."""
    return {
        "onnxprune": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def file_digest(path: str | os.PathLike[str], shown: str | os.PathLike[str] | None = None) -> dict:
    """``{path, bytes, sha256}`` of the file at ``path`` (``shown``: the path to record)."""
    st = os.stat(path)
    digest = _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    return {
        "path": str(shown if shown is not None else path),
        "bytes": st.st_size,
        "sha256": digest,
    }


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's SHA-256; ``size`` and ``mtime_ns`` key the cache (rule 4)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_digests(path: str | os.PathLike[str] | None) -> list[dict[str, Any]]:
    """The model file at ``path`` and its external data files (none when it is not a file)."""
    if path is None or not Path(path).is_file():
        return []
    return [file_digest(path)] + [file_digest(f) for f in model_data_files(path) if f.is_file()]


def written_digests(staged: Path, final: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A model just written to ``staged`` (and its ``.data`` beside it), recorded as ``final``."""
    out = [file_digest(staged, final)]
    data = staged.with_name(f"{staged.name}.data")
    if data.is_file():
        out.append(file_digest(data, f"{final}.data"))
    return out


def run_record(
    report: Mapping[str, Any],
    *,
    seed: int,
    device: str,
    model_path: str | os.PathLike[str] | None,
    data_path: str | os.PathLike[str] | None,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The keys of rules 1-4 for ``report`` (``status`` and ``gates`` only for a run report)."""
    record: dict[str, Any] = {}
    if "points" not in report:
        record = {"status": status(report), "gates": gate_summary(report)}
    data = [file_digest(data_path)] if data_path is not None and Path(data_path).is_file() else []
    return {
        **record,
        "versions": versions(),
        "seed": seed,
        "device": device,
        "argv": list(argv) if argv is not None else None,
        "files": {"model": model_digests(model_path), "data": data, "output": []},
    }
