"""The ``onnxprune`` command: a thin layer over :func:`onnxprune.run`.

Exit codes: 0 ok; 1 a validation gate failed; 2 bad usage or bad input; 3 a bug in onnxprune.
A run ends with one line on stdout (:func:`onnxprune.report.final_line`): PASSED only when gates
were checked and held, FAILED naming every failed gate (and exit 1), else DONE.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import onnx
import onnxruntime
from rich.console import Console

from onnxprune import commands
from onnxprune.distributed import require_ray
from onnxprune.errors import OnnxPruneError, ValidationFailed
from onnxprune.job import build_job
from onnxprune.report import (
    final_line,
)
from onnxprune.sweep import parse_values
from onnxprune.validation.gates import failed_gates, gate_message, verdict
from onnxprune.version import __version__

BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE
INTERNAL_EXIT = 3
Command = TypeVar("Command", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A one-line error with the exit code of the OnnxPruneError behind it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click's is a class default


def _version_message() -> str:
    here = Path(__file__).resolve().parent
    return (
        f"onnxprune {__version__} from {here} (Python {platform.python_version()}, "
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__})"
    )


def _sweep_values(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> list[float] | None:
    if value is None:
        return None
    try:
        return parse_values(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _gate_option(flag: str, metavar: str, when: str) -> Callable[[Command], Command]:
    """A gate's limit: a float option that sets the last validate pass's limit of that name."""
    return click.option(
        flag, type=float, default=None, metavar=metavar, help=f"Gate: fail (exit 1) when {when}."
    )


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
    "--eval-data",
    type=click.Path(path_type=Path),
    default=None,
    help="Data validate compares on [default: --data]; calibration keeps --data.",
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
    help="Write the full report as JSON here ('-': to stdout, the tables then go to stderr).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=None,
    help="Seed for anything random, an integer >= 0 [default: 0].",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME:D0,D1,...",
    help="Fix the dynamic dims of input NAME for synthetic inputs and costs (repeatable).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Calibrate and validate on N Ray tasks, a shard of the data each (needs onnxprune[ray]).",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="With --workers: join the Ray cluster at ADDR [default: start a local one].",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Store weights in OUT.data [default: only past 2 GB].",
)
@_gate_option("--max-accuracy-drop", "DROP", "accuracy drops more than this, e.g. 0.01")
@_gate_option("--min-cosine", "COS", "an output's mean cosine similarity is below this")
@_gate_option("--max-latency-ratio", "RATIO", "pruned/original median latency is above this")
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
    help="With --sweep: write a PNG of accuracy/cosine and latency ratio; without: the "
    "sensitivity plot of vote:sensitivity=on or a budget (needs matplotlib).",
)
@click.option("--list-passes", is_flag=True, help="List the passes and their options, then exit.")
@click.option(
    "--inspect",
    is_flag=True,
    help="Print the model's channel groups (what can shrink, and why not), then exit.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="With --inspect: print the channel groups as JSON (full node names) instead of a table.",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Print errors only (what you ask for on stdout: --report -, --json, still comes).",
)
@click.option("-v", "--verbose", is_flag=True, help="More detail; tracebacks on errors.")
@click.version_option(__version__, "-V", "--version", message=_version_message())
def main(
    model: Path | None,
    pass_specs: tuple[str, ...],
    output: Path | None,
    recipe: Path | None,
    data: Path | None,
    eval_data: Path | None,
    device: str | None,
    report_path: Path | None,
    seed: int | None,
    input_shapes: tuple[str, ...],
    workers: int | None,
    ray_address: str | None,
    external_data: bool | None,
    max_accuracy_drop: float | None,
    min_cosine: float | None,
    max_latency_ratio: float | None,
    sweep: list[float] | None,
    sweep_key: str,
    plot_path: Path | None,
    list_passes: bool,
    inspect: bool,
    as_json: bool,
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
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    out = Console(quiet=quiet)
    to_stdout = False
    start = time.perf_counter()
    gates = {
        "max_accuracy_drop": max_accuracy_drop,
        "min_cosine": min_cosine,
        "max_latency_ratio": max_latency_ratio,
    }
    try:
        if list_passes:
            commands.list_passes()
            return
        if model is None:
            raise click.UsageError("missing MODEL (or use --list-passes)")
        if as_json and not inspect:
            raise click.UsageError("--json needs --inspect (a run's JSON: --report FILE or -)")
        if ray_address is not None and workers is None:
            raise click.UsageError("--ray-address needs --workers N (the number of shards)")
        if workers is not None:
            require_ray()  # before any work
        job = build_job(
            model,
            pass_specs,
            output,
            recipe,
            data,
            device,
            report_path,
            seed,
            external_data,
            eval_data=eval_data,
            input_shapes=input_shapes,
            workers=workers,
            ray_address=ray_address,
        )
        to_stdout = job.report_to_stdout or (inspect and as_json)
        if to_stdout:
            out = Console(quiet=quiet, stderr=True)
        if inspect:
            commands.inspect(out, job, as_json)
            return
        report: dict[str, Any] | None
        if sweep is not None:
            report = commands.sweep(out, job, gates, sweep, sweep_key, plot_path)
        else:
            report = commands.prune(out, job, gates, plot_path)
    except OnnxPruneError as exc:
        if verbose:
            traceback.print_exc()
        raise CliError(str(exc), exc.exit_code) from exc
    except (click.ClickException, click.exceptions.Exit):
        raise
    except BrokenPipeError:
        _closed_stdout()
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if verbose:
            traceback.print_exc()
        msg = f"internal error (a bug in onnxprune, please report it): {type(exc).__name__}: {exc}"
        if not verbose:
            msg += "; rerun with -v for the traceback"
        raise CliError(msg, INTERNAL_EXIT) from exc
    _finish(report, time.perf_counter() - start, quiet, to_stdout)


def _closed_stdout() -> None:
    """The reader of stdout went away (``onnxprune --list-passes | head``): end quietly with
    the shell's status for SIGPIPE, as coreutils do, and keep Python from complaining again
    when it flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(BROKEN_PIPE_EXIT)


def _finish(report: dict[str, Any] | None, seconds: float, quiet: bool, to_stderr: bool) -> None:
    """The final line (PASSED, FAILED or DONE: :func:`verdict`; on stderr when the report
    takes stdout); exit 1 on a failed gate."""
    said = verdict(report) if report is not None else "DONE (summary only, no gates checked)"
    if not quiet:
        click.echo(final_line(said, seconds, sys.argv[1:]), err=to_stderr)
    failed = failed_gates(report) if report is not None and "points" not in report else []
    if failed:
        exc = ValidationFailed(gate_message(failed))
        raise CliError(str(exc), exc.exit_code)
