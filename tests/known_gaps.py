"""Fixtures that a generic every-fixture test cannot hold for yet, and why.

Each gap is a strict xfail of one check on one fixture (``folder/name``): the test still runs
with its full assertions, and when onnxprune learns the case, pytest reports the unexpected
pass as a failure, so the entry here must go. Add a gap only with the reason it fails.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

GAPS: dict[tuple[str, str], str] = {}


def fixture_id(path: str | Path) -> str:
    """``folder/name`` of a fixture model file under models/."""
    path = Path(path)
    return f"{path.parent.name}/{path.stem}"


def gap(check: str, path: str | Path) -> str | None:
    """Why ``check`` cannot hold on this fixture yet, or None when it must."""
    return GAPS.get((check, fixture_id(path)))


def params(check: str, paths: Iterable[str | Path]) -> list:
    """``paths`` as pytest params, ids ``folder/name``, known gaps marked strict xfail."""
    out = []
    for path in paths:
        reason = gap(check, path)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(path, id=fixture_id(path), marks=marks))
    return out
