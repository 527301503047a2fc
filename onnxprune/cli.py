"""The ``onnxprune`` command: a thin layer over :func:`onnxprune.run`.

Exit codes: 0 ok; 1 a validation gate failed; 2 bad usage or bad input; 3 a bug in onnxprune.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import onnx
import onnxruntime
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxprune.analysis.inspect import channel_groups
from onnxprune.cost import summarize
from onnxprune.errors import InternalError, ModelSaveError, OnnxPruneError, ValidationFailed
from onnxprune.model import load, save
from onnxprune.passes.base import Pass
from onnxprune.passes.registry import (
    available_passes,
    parse_pass_spec,
    pass_origin,
    unavailable_passes,
)
from onnxprune.passes.validate import with_gates
from onnxprune.pipeline import run
from onnxprune.recipe import load_recipe
from onnxprune.report import human, summary_table, write_json
from onnxprune.runtime import CPU
from onnxprune.sweep import parse_values, require_matplotlib, run_sweep, sweep_table, write_plot
from onnxprune.validation.gates import failed_gates, gate_message, validate_sections
from onnxprune.version import __version__

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


@dataclass
class Job:
    """What one run needs, with the recipe's settings merged under the command line's."""

    model: Path
    chain: list[Pass]
    data: Path | None
    device: str
    seed: int
    report: Path | None
    output: Path | None
    external_data: bool | None


def _sweep_values(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> list[float] | None:
    if value is None:
        return None
    try:
        return parse_values(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.option(
    "-p",
    "--pass",
    "pass_specs",
    multiple=True,
    metavar="PASS[:key=value,...]",
    help="A pass to run, with options; repeat for a chain (runs in order).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Output model [default: MODEL with a .pruned.onnx suffix]; with --sweep, a "
    "folder for each point's model [default: none written].",
)
@click.option(
    "--recipe",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML file with the pass chain and run options (see README).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibration/test data: .npz keyed by input name, optional 'labels'.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Execution provider for onnxruntime runs [default: auto].",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the full report as JSON here.",
)
@click.option("--seed", type=int, default=None, help="Seed for anything random [default: 0].")
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Store weights in OUT.data [default: only past 2 GB].",
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    default=None,
    metavar="DROP",
    help="Gate: fail (exit 1) when accuracy drops more than this, e.g. 0.01.",
)
@click.option(
    "--min-cosine",
    type=float,
    default=None,
    metavar="COS",
    help="Gate: fail (exit 1) when an output's mean cosine similarity is below this.",
)
@click.option(
    "--max-latency-ratio",
    type=float,
    default=None,
    metavar="RATIO",
    help="Gate: fail (exit 1) when pruned/original median latency is above this.",
)
@click.option(
    "--sweep",
    "sweep",
    default=None,
    callback=_sweep_values,
    metavar="START:STOP:STEP|V1,V2,...",
    help="Run the chain once per value of --sweep-key, validate each, tabulate.",
)
@click.option(
    "--sweep-key",
    default="sparsity",
    show_default=True,
    help="The pass option --sweep sets (in every pass that has it).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="With --sweep: write a PNG of accuracy/cosine and latency ratio (needs matplotlib).",
)
@click.option("--list-passes", is_flag=True, help="List the passes and their options, then exit.")
@click.option(
    "--inspect",
    is_flag=True,
    help="Print the model's channel groups (what can shrink, and why not), then exit.",
)
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
    max_accuracy_drop: float | None,
    min_cosine: float | None,
    max_latency_ratio: float | None,
    sweep: list[float] | None,
    sweep_key: str,
    plot_path: Path | None,
    list_passes: bool,
    inspect: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Prune an ONNX MODEL with a chain of passes and write the result.

    Without -p or --recipe, prints the model's summary and writes nothing. A gate option
    (--max-accuracy-drop, --min-cosine, --max-latency-ratio) sets the last validate pass's
    limits, appending one when the chain has none; a failed gate exits with 1 after writing
    the model and the report.

    \b
    Examples:
      onnxprune model.onnx                       # summary
      onnxprune model.onnx -p cleanup -o out.onnx
      onnxprune model.onnx -p fold --data test.npz --max-accuracy-drop 0.01
      onnxprune model.onnx -p my-prune -p fold --sweep 0.1:0.8:0.1 --plot sweep.png
      onnxprune --list-passes
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    out = Console(quiet=quiet)
    start = time.perf_counter()
    gates = {
        "max_accuracy_drop": max_accuracy_drop,
        "min_cosine": min_cosine,
        "max_latency_ratio": max_latency_ratio,
    }
    try:
        if list_passes:
            _list_passes()
            return
        if model is None:
            raise click.UsageError("missing MODEL (or use --list-passes)")
        if inspect:
            _inspect(out, model)
            return
        if plot_path is not None and sweep is None:
            raise click.UsageError("--plot needs --sweep")
        job = _job(
            model, pass_specs, output, recipe, data, device, report_path, seed, external_data
        )
        if sweep is not None:
            _sweep(out, job, gates, sweep, sweep_key, plot_path)
        else:
            _prune(out, job, gates)
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
        click.echo(
            f"PASSED | {time.perf_counter() - start:.2f} s | onnxprune {' '.join(sys.argv[1:])}"
        )


def _job(
    model_path: Path,
    pass_specs: tuple[str, ...],
    output: Path | None,
    recipe_path: Path | None,
    data: Path | None,
    device: str | None,
    report_path: Path | None,
    seed: int | None,
    external_data: bool | None,
) -> Job:
    """Merge the recipe (if any) and the command line; ``-p`` passes run after the recipe's."""
    settings: dict[str, Any] = {}
    chain: list[Pass] = []
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        settings, chain = recipe.settings, list(recipe.passes)
    chain += [parse_pass_spec(spec) for spec in pass_specs]
    data = data if data is not None else settings.get("data")
    out = output or settings.get("output")
    report = report_path or settings.get("report")
    return Job(
        model=model_path,
        chain=chain,
        data=Path(data) if data is not None else None,
        device=device or settings.get("device", "auto"),
        seed=seed if seed is not None else int(settings.get("seed", 0)),
        report=Path(report) if report is not None else None,
        output=Path(out) if out is not None else None,
        external_data=external_data,
    )


def _providers_line(providers: list[str], device: str) -> str:
    line = f"providers: {', '.join(providers)}"
    if device == "auto":
        line += " (auto: a usable GPU)" if providers[0] != CPU else " (auto: no usable GPU)"
    return line


def _prune(out: Console, job: Job, gates: dict[str, float | None]) -> None:
    chain = with_gates(job.chain, **gates)
    model = load(job.model)
    if not chain:
        out.print(summary_table(summarize(model).to_dict(), title=str(job.model)))
        out.print("no passes given (-p PASS or --recipe): summary only, nothing written")
        return
    target = job.output if job.output is not None else default_output(job.model)
    with out.status(f"running {', '.join(p.name for p in chain)}"):
        new, report = run(
            model,
            chain,
            data=job.data,
            device=job.device,
            seed=job.seed,
            model_path=job.model,
            inplace=True,
        )
    save(new, target, external_data=job.external_data, protect=job.model)
    report["output"] = str(target)
    out.print(summary_table(report["before"], report["after"], title=f"{job.model} -> {target}"))
    out.print(_passes_table(report["passes"]))
    for section in validate_sections(report):
        for table in validate_tables(section):
            out.print(table)
    out.print(_providers_line(report["providers"], job.device))
    _warn(out, report["passes"])
    if job.report is not None:
        write_json(report, job.report)
    failed = failed_gates(report)
    if failed:
        raise ValidationFailed(gate_message(failed))


def _warn(out: Console, sections: list[dict[str, Any]], prefix: str = "") -> None:
    """Validation warnings (a slower pruned model...), loudly (stderr keeps the error line)."""
    for s in validate_sections({"passes": sections}):
        for w in s["warnings"]:
            out.print(f"[bold red]WARNING:[/] {prefix}{w}", highlight=False)


def _sweep(
    out: Console,
    job: Job,
    gates: dict[str, float | None],
    values: list[float],
    key: str,
    plot_path: Path | None,
) -> None:
    if plot_path is not None:
        require_matplotlib()
    if job.output is not None:
        if job.output.suffix == ".onnx" or job.output.is_file():
            raise click.UsageError(
                f"with --sweep, -o is a folder for each point's model, not {job.output}"
            )
        try:
            job.output.mkdir(exist_ok=True)
        except OSError as exc:
            raise ModelSaveError(
                f"{job.output}: cannot create the folder: {exc.strerror or exc}"
            ) from exc
    chain = with_gates(job.chain, always=True, **gates)
    model = load(job.model)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=out, transient=True) as progress:
        task = progress.add_task(f"sweep {key}", total=len(values))
        report = run_sweep(
            model,
            chain,
            values,
            key,
            data=job.data,
            device=job.device,
            seed=job.seed,
            model_path=job.model,
            save_to=job.output,
            external_data=job.external_data,
            on_point=lambda *_: progress.advance(task),
        )
    out.print(sweep_table(report))
    out.print(_providers_line(report["providers"], job.device))
    for point in report["points"]:
        _warn(out, point["passes"], f"{key}={point['value']:g}: ")
    if plot_path is not None:
        report["plot"] = str(write_plot(report, plot_path))
        out.print(f"plot: {plot_path}")
    if job.report is not None:
        write_json(report, job.report)


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


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.3f}" if a and b is not None else ""


def _f(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def validate_tables(section: dict[str, Any]) -> list[Table]:
    """Terminal tables of one validate section: outputs, classification, cost, gates."""
    outputs = Table(
        title=f"validate: outputs on {section['data']['samples']} samples "
        f"({section['data']['source']})"
    )
    outputs.add_column("")
    for o in section["outputs"]:
        outputs.add_column(o["name"], justify="right")
    rows = (
        ("shape", lambda o: "x".join(map(str, o["shape"]))),
        ("max abs error", lambda o: _f(o["max_abs"])),
        ("mean abs error", lambda o: _f(o["mean_abs"])),
        ("max rel error", lambda o: _f(o["max_rel"])),
        ("mean rel error", lambda o: _f(o["mean_rel"])),
        ("cosine (mean)", lambda o: _f(o["cosine"], ".6f")),
        ("cosine (worst sample)", lambda o: _f(o["cosine_min"], ".6f")),
        ("top-1 agreement", lambda o: _f(o["top1"], ".2%")),
        ("new NaN/Inf", lambda o: str(o["nonfinite"])),
    )
    for label, cell in rows:
        outputs.add_row(label, *(cell(o) for o in section["outputs"]))
    tables = [outputs]
    cls = section["classification"]
    if cls:
        basis = "labels" if cls["labels"] else "original's predictions (no labels)"
        t = Table(title=f"validate: classification of {cls['output']} against {basis}")
        for col in ("", "original", "pruned", "difference"):
            t.add_column(col, justify="right")
        for k in ("accuracy", "precision", "recall", "f1"):
            label = k if k == "accuracy" else f"macro {k}"
            t.add_row(
                label,
                f"{cls['original'][k]:.4f}",
                f"{cls['pruned'][k]:.4f}",
                f"{cls['difference'][k]:+.4f}",
            )
        tables.append(t)
    cost, lat = section["cost"], section["latency"]
    dims = ", ".join(f"{k}={v}" for k, v in cost["dims"].items())
    t = Table(title="validate: cost" + (f" ({dims})" if dims else ""))
    for col in ("", "original", "pruned", "ratio"):
        t.add_column(col, justify="right")
    for k, label in (("parameters", "parameters"), ("macs", "MACs"), ("bytes", "size")):
        a, b = cost["original"][k], cost["pruned"][k]
        t.add_row(label, human(a, k), human(b, k), _ratio(a, b))
    if lat:
        for k, label in (("median_ms", "latency median ms"), ("p90_ms", "latency p90 ms")):
            a, b = lat["original"][k], lat["pruned"][k]
            t.add_row(label, f"{a:.4f}", f"{b:.4f}", _ratio(a, b))
        t.caption = (
            f"{lat['provider']}, threads {lat['threads'] or 'default'}, batch "
            f"{lat['batch']}, {lat['runs']} interleaved runs after {lat['warmup']} warm-up"
        )
    tables.append(t)
    if section["gates"]:
        t = Table(title="validate: gates")
        for col in ("gate", "output", "value", "limit", "result"):
            t.add_column(col, justify="right")
        for g in section["gates"]:
            value = g["value"] if isinstance(g["value"], int) else _f(g["value"])
            t.add_row(
                g["name"],
                g["output"] or "",
                str(value),
                f"{g['limit']:g}",
                "pass" if g["passed"] else "[bold red]FAIL[/]",
            )
        tables.append(t)
    return tables


def _inspect(out: Console, model_path: Path) -> None:
    groups = channel_groups(load(model_path))
    table = Table(title=f"channel groups of {model_path}")
    for col in ("#", "channels", "prunable", "MACs", "producers", "why not (first reason)"):
        table.add_column(col)
    for g in groups:
        free = g.channels - g.pinned
        table.add_row(
            str(g.index),
            str(g.channels),
            f"{free}/{g.channels}",
            human(g.macs),
            ", ".join(f"{s.op} {s.node}" for s in g.spaces),
            g.reasons[0] if g.reasons else "",
        )
    out.print(table)


def _list_passes() -> None:
    for name, cls in available_passes().items():
        click.echo(f"{name}  {cls.summary()}  ({pass_origin(name)})")
        for opt, typ, default, help_text in cls.option_specs():
            click.echo(f"    {opt}: {typ} = {default!r}  {help_text}")
    for u in unavailable_passes():
        click.echo(f"{u.name}  UNAVAILABLE from {u.origin}: {u.reason}")
