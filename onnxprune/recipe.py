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

from onnxprune.errors import OnnxPruneError, PassOptionError, RecipeError
from onnxprune.input_shapes import as_input_shapes
from onnxprune.passes.base import Pass
from onnxprune.passes.registry import get_pass

RUN_KEYS = {"data", "eval_data", "device", "seed", "output", "report", "input_shapes"}
PATH_KEYS = {"data", "eval_data", "output", "report"}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Recipe:
    """Passes (built) and run options (paths resolved against the recipe's folder)."""

    passes: list[Pass] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe file.

    Raises:
        RecipeError: missing file, bad TOML, unknown keys, a setting of the wrong type (seed
            not an integer >= 0, device not auto/cpu/cuda, a path not a string), or a pass
            entry that is not a table or has no name.
        PassNotFoundError: as for ``-p``.
        PassOptionError: as for ``-p``, with the file and the entry's number.
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
        if key == "input_shapes":  # ["x:1,3,224,224"] or {x = [1, 3, 224, 224]}
            recipe.settings[key] = _input_shapes(path, value)
            continue
        _check_setting(path, key, value)
        resolve = key in PATH_KEYS and value != "-"  # report = "-": stdout, as for --report -
        recipe.settings[key] = (path.parent / value) if resolve else value
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RecipeError(f"{path}: 'pass' must be an array of tables ([[pass]])")
    for i, entry in enumerate(entries, 1):
        options = dict(entry)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise RecipeError(f'{path}: [[pass]] number {i} has no name = "..."')
        try:
            recipe.passes.append(get_pass(name).from_options(options))
        except PassOptionError as exc:
            raise PassOptionError(f"{path}: [[pass]] number {i}: {exc}") from exc
    return recipe


def _input_shapes(path: Path, value: Any) -> dict[str, list[int]]:
    """The recipe's ``input_shapes`` as a dict (:func:`onnxprune.input_shapes.as_input_shapes`).

    Raises:
        RecipeError: naming the file and what is wrong.
    """
    try:
        return as_input_shapes(value, "input_shapes")
    except OnnxPruneError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def _check_setting(path: Path, key: str, value: Any) -> None:
    """A run setting has the type the command line gives it.

    Raises:
        RecipeError: naming the file, the key, the value and what is allowed.
    """
    if key in PATH_KEYS:
        ok, allowed = isinstance(value, str) and value.strip() != "", "a path (a string)"
    elif key == "device":
        ok, allowed = value in DEVICES, f"one of {', '.join(DEVICES)}"
    else:  # seed
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        allowed = "an integer >= 0"
    if not ok:
        raise RecipeError(f"{path}: {key} = {value!r}: expected {allowed}")
