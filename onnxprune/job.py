"""What one run needs: the command line's settings merged over the recipe's, and the plan of
the run's files (every input and output, checked before any work: :mod:`onnxprune.outputs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import onnx

from onnxprune.input_shapes import parse_input_shapes
from onnxprune.model import load, model_data_files
from onnxprune.outputs import OutputPlan, Target, is_stdout
from onnxprune.passes.base import Pass
from onnxprune.passes.registry import parse_pass_spec
from onnxprune.recipe import load_recipe
from onnxprune.runtime import Device


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
    device: Device
    seed: int
    report: Path | None
    output: Path | None
    external_data: bool | None
    recipe: Path | None = None
    eval_data: Path | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    workers: int | None = None
    ray_address: str | None = None

    @property
    def report_to_stdout(self) -> bool:
        """``--report -`` (or /dev/stdout): the JSON alone goes to stdout, the tables to stderr."""
        return self.report is not None and is_stdout(self.report)


def build_job(
    model_path: Path,
    pass_specs: tuple[str, ...],
    output: Path | None,
    recipe_path: Path | None,
    data: Path | None,
    device: str | None,
    report_path: Path | None,
    seed: int | None,
    external_data: bool | None,
    eval_data: Path | None = None,
    input_shapes: tuple[str, ...] = (),
    workers: int | None = None,
    ray_address: str | None = None,
) -> Job:
    """Merge the recipe (if any) and the command line; ``-p`` passes run after the recipe's,
    and an ``--input-shape`` replaces the recipe's shape of the same input."""
    settings: dict[str, Any] = {}
    chain: list[Pass] = []
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        settings, chain = recipe.settings, list(recipe.passes)
    chain += [parse_pass_spec(spec) for spec in pass_specs]
    data = data if data is not None else settings.get("data")
    eval_data = eval_data if eval_data is not None else settings.get("eval_data")
    out = output or settings.get("output")
    report = report_path or settings.get("report")
    shapes = {**settings.get("input_shapes", {}), **parse_input_shapes(input_shapes)}
    return Job(
        model=model_path,
        chain=chain,
        data=Path(data) if data is not None else None,
        device=cast(Device, device or settings.get("device", "auto")),
        seed=seed if seed is not None else int(settings.get("seed", 0)),
        report=Path(report) if report is not None else None,
        output=Path(out) if out is not None else None,
        external_data=external_data,
        recipe=recipe_path,
        eval_data=Path(eval_data) if eval_data is not None else None,
        input_shapes=shapes,
        workers=workers,
        ray_address=ray_address,
    )


def plan_files(job: Job) -> tuple[OutputPlan, Target | None]:
    """The run's inputs (model, --data, --eval-data, recipe) and its report file; the caller
    adds the rest."""
    plan = OutputPlan()
    plan.add_input("the input model", job.model)
    plan.add_input("the --data file", job.data)
    plan.add_input("the --eval-data file", job.eval_data)
    plan.add_input("the recipe", job.recipe)
    report = None
    if job.report is not None and not job.report_to_stdout:
        report = plan.add_output("--report", job.report, "report")
    return plan, report


def load_checked(plan: OutputPlan, job: Job) -> onnx.ModelProto:
    """Load the model once every output path is checked; its external data joins the inputs."""
    plan.check()
    model = load(job.model)
    for f in model_data_files(job.model):
        plan.add_input("the input model's external data", f)
    return model
