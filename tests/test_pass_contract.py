"""The pass contract: ``Pass.__call__`` runs requires -> run -> ensures and checks in_place;
the registry finds the built-ins without importlib; vote and stats keep their decisions apart."""

from __future__ import annotations

import ast
import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
import pytest
from conftest import invoke

import onnxprune
import onnxprune.passes
from onnxprune import Context, Pass, PassResult
from onnxprune.analysis.labels import ChannelGroup
from onnxprune.errors import (
    InternalError,
    OnnxPruneError,
    PassFailedError,
    PostconditionError,
    PreconditionError,
)
from onnxprune.passes import Cleanup, Fold, Refit, Stats, Validate, Vote, registry
from onnxprune.passes import fold as fold_module
from onnxprune.passes.registry import available_passes
from onnxprune.pruning.criteria import CRITERIA, register_criterion
from onnxprune.pruning.decision import GroupDecision

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits"
BUILTINS = {"cleanup", "fold", "fuse", "magnitude", "refit", "stats", "validate", "vote"}


@dataclass
class Needy(Pass):
    """A pass whose precondition is a plain check."""

    name: ClassVar[str] = "test-needy"

    def requires(self, model, ctx):
        if ctx.data_path is None:
            raise ValueError("needs --data")

    def run(self, model, ctx):
        return PassResult(model, False)


@dataclass
class Dangling(Pass):
    """A pass whose output onnx.checker rejects."""

    name: ClassVar[str] = "test-dangling"

    def run(self, model, ctx):
        model.graph.node[0].input[0] = "nowhere"
        return PassResult(model, True)


@dataclass
class Copies(Pass):
    """Returns a copy although it declares in_place (the default)."""

    name: ClassVar[str] = "test-copies"

    def run(self, model, ctx):
        return PassResult(copy.deepcopy(model), False)


@dataclass
class SameModel(Pass):
    """Returns its input although it declares in_place=False."""

    name: ClassVar[str] = "test-same"
    in_place: ClassVar[bool] = False

    def run(self, model, ctx):
        return PassResult(model, False)


# --- requires ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Refit, Validate])
def test_a_missing_original_is_a_precondition_error_naming_the_pass(cls, tiny) -> None:
    with pytest.raises(PreconditionError, match=f"pass {cls.name}: precondition failed: ") as exc:
        cls()(tiny, Context(original=None))
    assert "ctx.original is missing" in str(exc.value)
    assert isinstance(exc.value, PassFailedError) and exc.value.exit_code == 2  # bad input


def test_a_plain_check_in_requires_becomes_a_precondition_error(tiny) -> None:
    with pytest.raises(PreconditionError) as exc:
        Needy()(tiny, Context(original=tiny))
    assert str(exc.value) == "pass test-needy: precondition failed: ValueError: needs --data"
    assert isinstance(exc.value.__cause__, ValueError)


def test_the_pipeline_names_the_passes_before_a_failed_precondition(tiny) -> None:
    with pytest.raises(PreconditionError, match=r"needs --data \(passes before it: cleanup\)$"):
        onnxprune.run(tiny, ["cleanup", Needy()])


# --- ensures -----------------------------------------------------------------------------------


def test_a_directly_called_pass_gets_the_checker(tiny) -> None:
    Dangling().run(copy.deepcopy(tiny), Context(original=tiny))  # run alone checks nothing
    with pytest.raises(PostconditionError) as exc:
        Dangling()(copy.deepcopy(tiny), Context(original=tiny))
    text = str(exc.value)
    assert text.startswith("pass test-dangling: postcondition failed: output of pass test-dangling")
    assert "onnx.checker rejects the model" in text and "passes before it" not in text
    assert exc.value.exit_code == 2, "a user's pass broke its output: not onnxprune's bug"
    assert "a bug in onnxprune" not in text


def test_a_failed_postcondition_of_a_builtin_is_an_internal_bug(tiny, monkeypatch) -> None:
    def broken_ensures(self, result, ctx):
        raise InternalError("cleanup lost an output")

    monkeypatch.setattr(Cleanup, "ensures", broken_ensures)
    with pytest.raises(PostconditionError) as exc:
        onnxprune.run(tiny, ["cleanup"])
    assert exc.value.exit_code == 3
    assert str(exc.value) == (
        "pass cleanup: postcondition failed: cleanup lost an output (passes before it: none); "
        "a bug in onnxprune, please report it"
    )


def test_the_cli_exits_3_on_a_failed_builtin_postcondition(tmp_path, monkeypatch) -> None:
    def broken_ensures(self, result, ctx):
        raise InternalError("cleanup lost an output")

    monkeypatch.setattr(Cleanup, "ensures", broken_ensures)
    result = invoke(MODELS / "tf/mlp.onnx", "-p", "cleanup", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 3
    assert result.stderr.strip() == (
        "Error: pass cleanup: postcondition failed: cleanup lost an output "
        "(passes before it: none); a bug in onnxprune, please report it"
    )


def _zeroed_mlp() -> onnx.ModelProto:
    model = onnxprune.load(MODELS / "tf/mlp.onnx")
    zeroed, _ = onnxprune.run(model, ["cleanup", "vote:sparsity=0.5,round_to=1"], device="cpu")
    return zeroed


def test_fold_verifies_its_outputs_in_ensures() -> None:
    zeroed = _zeroed_mlp()
    ctx = Context(original=None)
    alone = Fold().run(copy.deepcopy(zeroed), ctx)
    assert alone.report["channels_removed"] > 0 and "verified" not in alone.report
    called = Fold()(copy.deepcopy(zeroed), ctx)
    assert called.report["verified"].startswith("outputs equal")
    assert "verified" not in Fold(verify=False)(copy.deepcopy(zeroed), ctx).report


def test_a_fold_that_changes_the_outputs_is_a_postcondition_error(monkeypatch) -> None:
    def differs(before, after):
        raise InternalError("fold changed output 'y' by 1 (scale 1)")

    monkeypatch.setattr(fold_module, "verify_same", differs)
    with pytest.raises(PostconditionError, match="pass fold: postcondition failed: fold changed"):
        Fold()(_zeroed_mlp(), Context(original=None))


# --- in_place and the result type -----------------------------------------------------------------


def test_in_place_is_declared_per_builtin_and_cleanup_returns_a_new_model(tiny) -> None:
    declared = {name: cls.in_place for name, cls in available_passes().items() if name in BUILTINS}
    assert declared == {name: name != "cleanup" for name in BUILTINS}
    result = Cleanup()(tiny, Context(original=tiny))
    assert result.model is not tiny


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (Copies, "declares in_place=True but returned a new model"),
        (SameModel, "declares in_place=False but returned the model it was given"),
    ],
)
def test_a_broken_in_place_declaration_is_addressed_to_the_pass_developer(
    cls, message, tiny
) -> None:
    with pytest.raises(PassFailedError, match=f"pass {cls.name} {message} \\(pass developer: "):
        cls()(tiny, Context(original=tiny))
    with pytest.raises(PassFailedError, match=message):
        onnxprune.run(tiny, [cls()])


def test_a_directly_called_pass_must_return_a_pass_result(tiny) -> None:
    @dataclass
    class Wrong(Pass):
        name: ClassVar[str] = "test-wrong"

        def run(self, model, ctx):
            return model

    with pytest.raises(PassFailedError, match="test-wrong returned ModelProto, not a PassResult"):
        Wrong()(tiny, Context(original=tiny))


# --- the registry ------------------------------------------------------------------------------


def _imports(nodes) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_the_registry_imports_no_pass_module() -> None:
    tree = ast.parse(inspect.getsource(registry))
    assert _imports(tree.body) == {
        "__future__",
        "dataclasses",
        "importlib.metadata",
        "onnxprune.errors",
        "onnxprune.passes.base",
    }
    everywhere = _imports(ast.walk(tree))
    assert "importlib" not in everywhere and not hasattr(registry, "BUILTIN_MODULES")
    # not even lazily: importing the registry runs onnxprune/passes/__init__ first, which
    # imports the built-ins (lint-imports proves there is no circle)
    assert everywhere == _imports(tree.body)


def test_the_builtins_register_themselves_when_the_package_is_imported() -> None:
    passes = available_passes()
    builtins = [getattr(onnxprune.passes, n) for n in onnxprune.passes.__all__]
    assert {cls.name for cls in builtins} == BUILTINS
    for cls in builtins:
        assert passes[cls.name] is cls
        assert registry.pass_origin(cls.name) == cls.__module__


def test_a_duplicate_criterion_is_an_onnxprune_error() -> None:
    before = dict(CRITERIA)
    with pytest.raises(OnnxPruneError, match="criterion 'l1' is registered twice"):
        register_criterion("l1")(lambda view: None)
    assert before == CRITERIA


# --- GroupDecision -----------------------------------------------------------------------------


def test_group_decision_defaults() -> None:
    group = ChannelGroup(0, [], 4, 0, [], [])
    d = GroupDecision(group, {"group": 0})
    assert d.picked == set() and d.choices == {} and d.section == {"group": 0}


def _scratch_keys(sections: list[dict]) -> set[str]:
    return {k for s in sections for k in s if k.startswith("_")}


@pytest.mark.parametrize("scope", ["local", "global"])
def test_vote_keeps_its_options_and_reports_no_scratch(scope: str) -> None:
    model = onnxprune.load(DIGITS / "keras_cnn.onnx")
    vote = Vote(sparsity=0.5, scope=scope)
    before = vars(vote).copy()
    _, report = onnxprune.run(model, [vote], data=DIGITS / "keras_cnn.calib.npz")
    assert vars(vote) == before, "run must not change the pass's own state"
    section = report["passes"][0]
    assert section["groups"] and not _scratch_keys(section["groups"])
    assert sum(g["pruned"] for g in section["groups"]) == section["channels_pruned"]
    if scope == "local":
        assert "selected" in section  # the selection ran on the per-group choices


def test_stats_reports_no_scratch() -> None:
    model = onnxprune.load(DIGITS / "keras_cnn.onnx")
    _, report = onnxprune.run(model, [Stats(metric="l1", below=1e9)])
    groups = report["passes"][0]["groups"]
    assert groups and not _scratch_keys(groups)
    assert list(groups[0]) == ["group", "channels", "min", "max", "pruned"]
