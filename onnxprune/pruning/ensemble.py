"""Ensemble members of one architecture: their weights (and activations) vote too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onnxprune.errors import PassOptionError
from onnxprune.graph import get_init, prepare_for_pruning
from onnxprune.model import load
from onnxprune.pruning.calibrate import activation_stats
from onnxprune.pruning.criteria import Criterion
from onnxprune.pruning.workspace import Workspace


def ensemble_arrays(
    ws: Workspace, paths: Sequence[str], criteria: Sequence[Criterion]
) -> list[tuple[str, Any, dict]]:
    """(tag, initializer getter, activation statistics) of each member at ``paths``.

    Raises:
        PassOptionError: a member whose pruned initializers differ from the model's in name
            or shape (members must share one architecture).
    """
    out = []
    names = {m.init for m in ws.an.members}
    shapes = {t.name: list(t.dims) for t in ws.model.graph.initializer if t.name in names}
    for path in paths:
        other = load(path)
        prepare_for_pruning(other.graph)
        theirs = {t.name: list(t.dims) for t in other.graph.initializer if t.name in shapes}
        if theirs != shapes:
            missing = sorted(set(shapes) - set(theirs)) or sorted(
                n for n in shapes if theirs.get(n) != shapes[n]
            )
            raise PassOptionError(
                f"pass vote: ensemble member {path} differs from the model in "
                f"initializer(s) {missing[:3]}: members must share one architecture"
            )
        stats: dict = {}
        if any(c.needs_data for c in criteria):
            stats = activation_stats(ws.ctx, other, ws.sink_tensors(), mask=ws.mask)
        out.append((str(path), (lambda g: lambda name: get_init(g, name))(other.graph), stats))
    return out
