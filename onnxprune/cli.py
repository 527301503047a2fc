"""The ``onnxprune`` command: a thin layer over :func:`onnxprune.run`.

Exit codes: 0 ok; 1 a validation gate failed; 2 bad usage or bad input; 3 a bug in onnxprune.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click
import onnx
import onnxruntime
from rich.console import Console
from rich.table import Table

from onnxprune import __version__
from onnxprune.errors import InternalError, OnnxPruneError
from onnxprune.groups import channel_groups
from onnxprune.model import load, save
from onnxprune.passes.base import Pass
from onnxprune.pipeline import run
from onnxprune.recipe import load_recipe
from onnxprune.registry import (
    available_passes,
    parse_pass_spec,
    pass_origin,
    unavailable_passes,
)
from onnxprune.report import human, summary_table, write_json
from onnxprune.summary import summarize

INTERNAL_EXIT = 3


class CliError(click.ClickException):
    """A one-line error with the exit code of the OnnxPruneError behind it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _version_message() -> str:
    here = Path(__file__).resolve().parent
    return (
        f"onnxprune {__version__} from {here} (Python {platform.python_version()}, "
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__})"
    )


def default_output(model: Path) -> Path:
    """``dir/name.onnx`` -> ``dir/name.pruned.onnx`` (never the input itself)."""
    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{stem}.pruned.onnx")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="PASS[:key=value,...]",
              help="A pass to run, with options; repeat for a chain (runs in order).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output model [default: MODEL with a .pruned.onnx suffix].")
@click.option("--recipe", type=click.Path(path_type=Path), default=None,
              help="TOML file with the pass chain and run options (see README).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Calibration/test data: .npz keyed by input name, optional 'labels'.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Execution provider for onnxruntime runs [default: auto].")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write the full report as JSON here.")
@click.option("--seed", type=int, default=None, help="Seed for anything random [default: 0].")
@click.option("--external-data/--no-external-data", default=None,
              help="Store weights in OUT.data [default: only past 2 GB].")
@click.option("--list-passes", is_flag=True, help="List the passes and their options, then exit.")
@click.option("--inspect", is_flag=True,
              help="Print the model's channel groups (what can shrink, and why not), then exit.")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
@click.option("-v", "--verbose", is_flag=True, help="More detail; tracebacks on errors.")
@click.version_option(__version__, "-V", "--version", message=_version_message())
def main(
    model: Path | None,
    pass_specs: tuple[str, ...],
    output: Path | None,
    recipe: Path | None,
    data: Path | None,
    device: str | None,
    report_path: Path | None,
    seed: int | None,
    external_data: bool | None,
    list_passes: bool,
    inspect: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Prune an ONNX MODEL with a chain of passes and write the result.

    Without -p or --recipe, prints the model's summary and writes nothing.

    \b
    Examples:
      onnxprune model.onnx                       # summary
      onnxprune model.onnx -p cleanup -o out.onnx
      onnxprune --list-passes
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    out = Console(quiet=quiet)
    start = time.perf_counter()
    try:
        if list_passes:
            _list_passes()
            return
        if model is None:
            raise click.UsageError("missing MODEL (or use --list-passes)")
        if inspect:
            _inspect(out, model)
            return
        _prune(out, model, pass_specs, output, recipe, data, device, report_path, seed, external_data)
    except OnnxPruneError as exc:
        if verbose:
            traceback.print_exc()
        raise CliError(str(exc), exc.exit_code) from exc
    except (click.ClickException, click.exceptions.Exit):
        raise
    except (InternalError, Exception) as exc:  # noqa: BLE001 - the last line of defence
        if verbose:
            traceback.print_exc()
        msg = f"internal error (a bug in onnxprune, please report it): {type(exc).__name__}: {exc}"
        if not verbose:
            msg += "; rerun with -v for the traceback"
        raise CliError(msg, INTERNAL_EXIT) from exc
    if not quiet:
        click.echo(f"PASSED | {time.perf_counter() - start:.2f} s | onnxprune {' '.join(sys.argv[1:])}")


def _prune(
    out: Console,
    model_path: Path,
    pass_specs: tuple[str, ...],
    output: Path | None,
    recipe_path: Path | None,
    data: Path | None,
    device: str | None,
    report_path: Path | None,
    seed: int | None,
    external_data: bool | None,
) -> None:
    settings: dict[str, Any] = {}
    chain: list[Pass] = []
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        settings, chain = recipe.settings, list(recipe.passes)
    chain += [parse_pass_spec(spec) for spec in pass_specs]
    data = data if data is not None else settings.get("data")
    device = device or settings.get("device", "auto")
    seed = seed if seed is not None else int(settings.get("seed", 0))
    report_path = report_path or settings.get("report")
    output = output or settings.get("output")

    model = load(model_path)
    if not chain:
        out.print(summary_table(summarize(model).to_dict(), title=str(model_path)))
        out.print("no passes given (-p PASS or --recipe): summary only, nothing written")
        return
    target = Path(output) if output is not None else default_output(model_path)
    new, report = run(model, chain, data=data, device=device, seed=seed, model_path=model_path)
    save(new, target, external_data=external_data, protect=model_path)
    report["output"] = str(target)
    out.print(summary_table(report["before"], report["after"], title=f"{model_path} -> {target}"))
    out.print(_passes_table(report["passes"]))
    out.print(f"providers: {', '.join(report['providers'])}")
    if report_path is not None:
        write_json(report, report_path)


def _passes_table(sections: list[dict[str, Any]]) -> Table:
    table = Table(title="passes")
    for col in ("pass", "modified", "seconds", "details"):
        table.add_column(col)
    skip = {"pass", "options", "modified", "seconds"}
    for s in sections:
        details = ", ".join(
            f"{k}={v}" for k, v in s.items() if k not in skip and not isinstance(v, (list, dict))
        )
        table.add_row(s["pass"], "yes" if s["modified"] else "no", f"{s['seconds']:.3f}", details)
    return table


def _inspect(out: Console, model_path: Path) -> None:
    groups = channel_groups(load(model_path))
    table = Table(title=f"channel groups of {model_path}")
    for col in ("#", "channels", "prunable", "MACs", "producers", "why not (first reason)"):
        table.add_column(col)
    for g in groups:
        free = g.channels - g.pinned
        table.add_row(
            str(g.index), str(g.channels), f"{free}/{g.channels}", human(g.macs),
            ", ".join(f"{s.op} {s.node}" for s in g.spaces), g.reasons[0] if g.reasons else "",
        )
    out.print(table)


def _list_passes() -> None:
    for name, cls in available_passes().items():
        click.echo(f"{name}  {cls.summary()}  ({pass_origin(name)})")
        for opt, typ, default, help_text in cls.option_specs():
            click.echo(f"    {opt}: {typ} = {default!r}  {help_text}")
    for u in unavailable_passes():
        click.echo(f"{u.name}  UNAVAILABLE from {u.origin}: {u.reason}")
