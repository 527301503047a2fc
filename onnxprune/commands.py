"""What each mode of the command line does: prune (run the chain), sweep, inspect, list passes.

:mod:`onnxprune.cli` parses the options, builds the :class:`~onnxprune.job.Job` and calls one
of these; each writes its files through the job's plan and prints through ``out``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import onnx
from rich.console import Console, RenderableType

from onnxprune import progress, scratch
from onnxprune.analysis.inspect import inspect_model
from onnxprune.cost import summarize
from onnxprune.input_shapes import check_input_shapes
from onnxprune.job import Job, default_output, load_checked, plan_files
from onnxprune.model import load, write_model
from onnxprune.passes.budget_options import BudgetOptions
from onnxprune.passes.registry import (
    available_passes,
    pass_origin,
    unavailable_passes,
)
from onnxprune.passes.validate import with_gates
from onnxprune.pipeline import run
from onnxprune.plot import plot_file, sensitivity_section, write_plot
from onnxprune.provenance import run_record, written_digests
from onnxprune.report import (
    groups_table,
    inspect_report,
    providers_line,
    report_json,
    run_view,
    summary_table,
    sweep_view,
    uncovered_table,
    write_json,
)
from onnxprune.runtime import providers_for
from onnxprune.sweep import add_points, run_sweep
from onnxprune.synthesis import load_data

PLOT_NEEDS = "--plot needs --sweep, vote:sensitivity=on or a budget"


def prune(
    out: Console, job: Job, gates: dict[str, float | None], plot_path: Path | None = None
) -> dict[str, Any] | None:
    """Run the chain, write the model, the report and the sensitivity plot (``--plot``); the
    report (None: summary only)."""
    chain = with_gates(job.chain, **gates)  # type: ignore[arg-type]  # limits only
    if not chain:
        model = load(job.model)
        check_input_shapes(model, job.input_shapes)
        summary = summarize(model, input_shapes=job.input_shapes)
        out.print(summary_table(summary.to_dict(), title=str(job.model)))
        out.print("no passes given (-p PASS or --recipe): summary only, nothing written")
        return None
    if plot_path is not None and not any(
        isinstance(p, BudgetOptions) and p.measures_sensitivity() for p in chain
    ):  # before any work; a vote with no group to measure is caught after the run
        raise click.UsageError(PLOT_NEEDS)
    target = job.output if job.output is not None else default_output(job.model)
    plan, report_file = plan_files(job)
    model_file = plan.add_model("-o", target, job.external_data)
    plot = plan.add_output("--plot", plot_file(plot_path), "plot") if plot_path else None
    model = load_checked(plan, job)
    with (
        plan,
        progress.display(quiet=out.quiet),
        scratch.placed(Path(target).resolve().parent),  # fold's file can become the output's data
    ):
        new, report = run(
            model,
            chain,
            data=job.data,
            eval_data=job.eval_data,
            device=job.device,
            seed=job.seed,
            model_path=job.model,
            inplace=True,
            input_shapes=job.input_shapes,
            workers=job.workers,
            ray_address=job.ray_address,
        )
        plan.write(model_file, lambda file: _write_model(new, file, job, target, report))
        report["output"] = str(target)
        report["argv"] = argv()
        if plot is not None:
            if sensitivity_section(report) is None:
                raise click.UsageError(PLOT_NEEDS)
            plan.write(plot, lambda file: write_plot(report, file))
        if report_file is not None:
            plan.write(report_file, lambda file: file.write_text(report_json(report)))
    _show(out, run_view(report, f"{job.model} -> {target}", job.device))
    if job.report_to_stdout:
        write_json(report, "-")
    return report


def argv() -> list[str]:
    """The command line as run, for the report (``onnxprune`` and its arguments)."""
    return ["onnxprune", *sys.argv[1:]]


def _write_model(
    model: onnx.ModelProto, file: Path, job: Job, target: Path, report: dict[str, Any]
) -> None:
    """Write the model to its staged ``file`` and record its SHA-256 (as ``target``)."""
    write_model(model, file, job.external_data, last_use=True)  # the run is over
    report["files"]["output"] = written_digests(file, target)


def _show(out: Console, view: list[RenderableType]) -> None:
    """Print a run's or a sweep's view on ``out`` (stderr keeps the one error line)."""
    for item in view:
        out.print(item)


def sweep(
    out: Console,
    job: Job,
    gates: dict[str, float | None],
    values: list[float],
    key: str,
    plot_path: Path | None,
) -> dict[str, Any]:
    plan, report_file = plan_files(job)
    plot = plan.add_output("--plot", plot_file(plot_path), "plot") if plot_path else None
    if job.output is not None:
        if job.output.suffix == ".onnx" or job.output.is_file():
            raise click.UsageError(
                f"with --sweep, -o is a folder for each point's model, not {job.output}"
            )
        add_points(plan, "-o", job.output, job.model, key, values, job.external_data)
    chain = with_gates(job.chain, always=True, **gates)
    model = load_checked(plan, job)
    with plan, progress.display(quiet=out.quiet), progress.task(len(values), key) as advance:
        report = run_sweep(
            model,
            chain,
            values,
            key,
            data=job.data,
            eval_data=job.eval_data,
            device=job.device,
            seed=job.seed,
            model_path=job.model,
            save_to=job.output,
            external_data=job.external_data,
            on_point=lambda *_: advance(),
            plan=plan,
            input_shapes=job.input_shapes,
            workers=job.workers,
            ray_address=job.ray_address,
        )
        if plot is not None:
            plan.write(plot, lambda file: write_plot(report, file))
            report["plot"] = str(plot.path)
        report["argv"] = argv()
        if report_file is not None:
            plan.write(report_file, lambda file: file.write_text(report_json(report)))
    _show(out, sweep_view(report, job.device))
    if plot is not None:
        out.print(f"plot: {plot.path}")
    if job.report_to_stdout:
        write_json(report, "-")
    return report


def inspect(out: Console, job: Job, as_json: bool) -> None:
    """``--inspect``: the channel groups (probed on ``--data`` when given, with ``--seed`` and
    ``--device``) as a table, or as JSON on stdout (``--json``); ``--report`` writes the JSON."""
    plan, report_file = plan_files(job)
    model = load_checked(plan, job)
    providers = providers_for(job.device)
    data = load_data(job.data, model, seed=job.seed) if job.data is not None else None
    groups, uncovered = inspect_model(model, job.seed, providers=providers, data=data)
    record = {
        "model": str(job.model),
        "providers": providers,
        "data": data.source if data is not None else None,
        **run_record(
            {"points": []},
            seed=job.seed,
            device=job.device,
            model_path=job.model,
            data_path=job.data,
            argv=argv(),
        ),
    }
    report = inspect_report(groups, record)
    if report_file is not None:
        with plan:
            plan.write(report_file, lambda file: file.write_text(report_json(report)))
    if as_json or job.report_to_stdout:
        write_json(report, "-")
    if not as_json:
        out.print(groups_table(groups, f"channel groups of {job.model}"))
        if uncovered:
            out.print(uncovered_table(uncovered))
        out.print(providers_line(providers, job.device))


def list_passes() -> None:
    for name, cls in available_passes().items():
        click.echo(f"{name}  {cls.summary()}  ({pass_origin(name)})")
        for opt, typ, default, help_text in cls.option_specs():
            click.echo(f"    {opt}: {typ} = {default!r}  {help_text}")
    for u in unavailable_passes():
        click.echo(f"{u.name}  UNAVAILABLE from {u.origin}: {u.reason}")
