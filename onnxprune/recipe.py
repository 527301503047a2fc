"""Recipe files: the pass chain and run options of a deployment build, in TOML.

Example::

    data = "calib.npz"          # paths are relative to the recipe file
    device = "cpu"
    output = "small.onnx"

    [[pass]]
    name = "cleanup"

    [[pass]]
    name = "fold"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxprune.errors import RecipeError
from onnxprune.passes.base import Pass
from onnxprune.passes.registry import get_pass

RUN_KEYS = {"data", "device", "seed", "output", "report"}
PATH_KEYS = {"data", "output", "report"}


@dataclass
class Recipe:
    """Passes (built) and run options (paths resolved against the recipe's folder)."""

    passes: list[Pass] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe file.

    Raises:
        RecipeError: missing file, bad TOML, unknown keys, or a pass entry without a name.
        PassNotFoundError, PassOptionError: as for ``-p``.
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from exc
    entries = doc.pop("pass", [])
    unknown = sorted(set(doc) - RUN_KEYS)
    if unknown:
        raise RecipeError(
            f"{path}: unknown key(s) {unknown}; allowed: {sorted(RUN_KEYS)} and [[pass]]"
        )
    recipe = Recipe()
    for key, value in doc.items():
        resolve = key in PATH_KEYS and value != "-"  # report = "-": stdout, as for --report -
        recipe.settings[key] = (path.parent / value) if resolve else value
    if not isinstance(entries, list):
        raise RecipeError(f"{path}: 'pass' must be an array of tables ([[pass]])")
    for i, entry in enumerate(entries, 1):
        options = dict(entry)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise RecipeError(f'{path}: [[pass]] number {i} has no name = "..."')
        recipe.passes.append(get_pass(name).from_options(options))
    return recipe
