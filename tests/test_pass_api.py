"""The Pass API: typed options, spec parsing, registration, running custom passes, plugins."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import onnx
import pytest

import onnxprune
from onnxprune import Pass, PassResult, option, register_pass
from onnxprune.errors import (
    InternalError,
    OnnxPruneError,
    PassFailedError,
    PassNotFoundError,
    PassOptionError,
)
from onnxprune.passes.registry import available_passes, parse_pass_spec

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIST = Path(__file__).resolve().parent / "plugin_dist"


@dataclass
class Opts(Pass):
    """A pass with one option of every supported type (never registered)."""

    name: ClassVar[str] = "opts"
    flag: bool = option(False, "a bool")
    count: int = option(1, "an int")
    ratio: float = option(0.5, "a float")
    mode: Literal["fast", "exact"] = option("fast", "a choice")
    level: Literal[1, 2, 3] = option(1, "an int choice")
    names: tuple[str, ...] = option((), "a list of names")
    sizes: tuple[int, ...] = option((), "a list of ints")
    limit: int | None = option(None, "an optional int")
    label: str = option("", "a string")

    def run(self, model, ctx):
        return PassResult(model, modified=False, report=self.options())


# --- typed options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "value"),
    [
        ("flag", "true", True),
        ("flag", "Yes", True),
        ("flag", "1", True),
        ("flag", "off", False),
        ("flag", False, False),
        ("count", "7", 7),
        ("count", 3, 3),
        ("count", 4.0, 4),
        ("count", "-2", -2),
        ("ratio", "0.25", 0.25),
        ("ratio", "1e-3", 1e-3),
        ("ratio", 2, 2.0),
        ("mode", "exact", "exact"),
        ("level", "2", 2),
        ("level", 3, 3),
        ("names", "a+b", ("a", "b")),
        ("names", "a,b,c", ("a", "b", "c")),
        ("names", "", ()),
        ("names", ["x", "y"], ("x", "y")),
        ("sizes", "1+2+ 3", (1, 2, 3)),
        ("sizes", [4, 5], (4, 5)),
        ("sizes", 7, (7,)),
        ("limit", "none", None),
        ("limit", "", None),
        ("limit", None, None),
        ("limit", "9", 9),
        ("label", "a,b", "a,b"),
        ("label", 5, "5"),
    ],
)
def test_from_options_coerces(key, raw, value):
    p = Opts.from_options({key: raw})
    assert getattr(p, key) == value
    assert type(getattr(p, key)) is type(value)


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("flag", "maybe", "expected true or false"),
        ("count", "2.5", "expected an integer"),
        ("count", 2.5, "expected an integer"),
        ("count", True, "expected an integer"),
        ("ratio", "abc", "expected a number"),
        ("ratio", True, "expected a number"),
        ("mode", "slow", "expected one of fast, exact"),
        ("level", "4", "expected one of 1, 2, 3"),
        ("sizes", "1+x", "expected an integer"),
        ("limit", "many", "expected an integer"),
    ],
)
def test_from_options_rejects_bad_values(key, raw, expected):
    with pytest.raises(PassOptionError) as err:
        Opts.from_options({key: raw})
    msg = str(err.value)
    assert msg.startswith(f"pass opts: option {key}=")
    assert expected in msg and "\n" not in msg


def test_unknown_option_names_pass_key_and_allowed():
    with pytest.raises(PassOptionError) as err:
        Opts.from_options({"colour": "red"})
    msg = str(err.value)
    assert "pass opts" in msg and "'colour'" in msg
    for name in ("flag", "count", "ratio", "mode", "level", "names", "sizes", "limit", "label"):
        assert name in msg


def test_hyphenated_keys_and_defaults():
    p = Opts.from_options({"limit": "3"})
    assert (p.flag, p.count, p.ratio, p.mode, p.names, p.limit) == (False, 1, 0.5, "fast", (), 3)
    assert Opts.from_options({"label": "x"}).options()["names"] == []  # JSON-ready
    with pytest.raises(PassOptionError, match="unknown option 'my-key'"):
        Opts.from_options({"my-key": 1})


def test_option_specs_and_summary():
    specs = {name: (typ, default, help_) for name, typ, default, help_ in Opts.option_specs()}
    assert specs["flag"] == ("bool", False, "a bool")
    assert specs["mode"][0] == "fast|exact"
    assert specs["names"][0] == "str+..."
    assert specs["limit"][0] == "int?"
    assert Opts.summary() == "A pass with one option of every supported type (never registered)."
    cleanup = available_passes()["cleanup"]
    assert [s[0] for s in cleanup.option_specs()] == [
        "fold_constants",
        "fold_limit_mb",
        "keep_initializer_inputs",
    ]


# --- pass specs and registration ------------------------------------------------------------------


def test_parse_pass_spec(isolated_registry):
    register_pass(Opts)
    p = parse_pass_spec("opts:names=a.onnx,b.onnx,c.onnx,count=2")
    assert p.names == ("a.onnx", "b.onnx", "c.onnx") and p.count == 2
    assert parse_pass_spec("opts:label=x,y, z,flag=on").label == "x,y,z"
    assert parse_pass_spec("opts: mode = exact ").mode == "exact"
    assert parse_pass_spec("opts").options() == Opts().options()
    assert parse_pass_spec("opts:").options() == Opts().options()
    with pytest.raises(PassOptionError, match="expected key=value"):
        parse_pass_spec("opts:oops,count=1")
    with pytest.raises(PassOptionError, match="empty option name"):
        parse_pass_spec("opts:=1")
    with pytest.raises(PassNotFoundError, match="unknown pass 'nope'.*cleanup"):
        parse_pass_spec("nope:x=1")


def test_register_pass_rejects_duplicates_and_empty_names(isolated_registry):
    register_pass(Opts)
    assert register_pass(Opts) is Opts  # the same class again is fine

    @dataclass
    class Other(Pass):
        name: ClassVar[str] = "opts"

    with pytest.raises(OnnxPruneError, match="'opts' is registered twice"):
        register_pass(Other)

    @dataclass
    class Clash(Pass):
        name: ClassVar[str] = "cleanup"

    with pytest.raises(OnnxPruneError, match="onnxprune.passes.cleanup"):
        register_pass(Clash)

    @dataclass
    class Nameless(Pass):
        pass

    with pytest.raises(OnnxPruneError, match="non-empty `name`"):
        register_pass(Nameless)
    assert available_passes()["cleanup"].__module__ == "onnxprune.passes.cleanup"


# --- custom passes through onnxprune.run ------------------------------------------------------------


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- test: custom-pass -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its custom-pass example (marked <!-- test: custom-pass -->)"
    return m.group(1)


def test_readme_custom_pass_example(isolated_registry, tmp_path, monkeypatch, model_path):
    model_path("tf/cnn.onnx")
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_example"}
    exec(compile(_readme_example(), "README.md", "exec", dont_inherit=True), namespace)
    assert "strip-docs" in available_passes()
    written = [p.name for p in tmp_path.iterdir() if p.suffix == ".onnx"]
    assert len(written) == 1
    saved = onnxprune.load(tmp_path / written[0])
    assert saved.graph.doc_string == ""
    assert all(not n.doc_string for n in saved.graph.node)
    entry = onnxprune.model.provenance(saved)[-1]
    assert [p["name"] for p in entry["passes"]][0] == "strip-docs"


def test_custom_pass_in_a_chain(isolated_registry, tiny, tiny_feeds, run_ort, same_outputs):
    @register_pass
    @dataclass
    class Rename(Pass):
        """Prefix every node name."""

        name: ClassVar[str] = "test-rename"
        prefix: str = option("n_", "the prefix")

        def run(self, model, ctx):
            assert ctx.original is not model  # a private copy
            for node in model.graph.node:
                node.name = self.prefix + node.name
            return PassResult(model, modified=True, report={"renamed": len(model.graph.node)})

    new, report = onnxprune.run(tiny, ["test-rename:prefix=a_", Rename(prefix="b_"), "cleanup"])
    assert [n.name for n in new.graph.node] == ["b_a_matmul", "b_a_add"]
    assert [n.name for n in tiny.graph.node] == ["matmul", "add"], "input model unchanged"
    assert [s["pass"] for s in report["passes"]] == ["test-rename", "test-rename", "cleanup"]
    assert report["passes"][0]["renamed"] == 2 and report["passes"][0]["options"] == {
        "prefix": "a_"
    }
    assert set(report) >= {"onnxprune", "model", "providers", "before", "passes", "after"}
    same_outputs(run_ort(new, tiny_feeds), run_ort(tiny, tiny_feeds))


def test_failing_passes_are_named(isolated_registry, tiny):
    @dataclass
    class Broken(Pass):
        name: ClassVar[str] = "test-broken"
        how: str = "crash"

        def run(self, model, ctx):
            if self.how == "crash":
                raise RuntimeError("boom")
            if self.how == "dangling":
                model.graph.node[0].input[0] = "nowhere"
                return PassResult(model, modified=True)
            if self.how == "refuse":
                raise PassFailedError("test-broken: cannot work on this model")
            return model  # not a PassResult

    with pytest.raises(InternalError, match="pass test-broken .*RuntimeError: boom"):
        onnxprune.run(tiny, [Broken()])
    with pytest.raises(
        PassFailedError, match="output of pass test-broken.*passes before it: cleanup"
    ):
        onnxprune.run(tiny, ["cleanup", Broken(how="dangling")])
    with pytest.raises(PassFailedError, match="cannot work on this model"):
        onnxprune.run(tiny, [Broken(how="refuse")])
    with pytest.raises(PassFailedError, match="returned ModelProto, not a PassResult"):
        onnxprune.run(tiny, [Broken(how="wrong")])


def test_run_without_passes_adds_provenance_only(tiny):
    new, report = onnxprune.run(tiny, [])
    assert new is not tiny and new.graph == tiny.graph
    assert report["passes"] == []
    unchanged = {k: v for k, v in report["before"].items() if k != "bytes"}  # + provenance
    assert {k: v for k, v in report["after"].items() if k != "bytes"} == unchanged
    assert onnxprune.model.provenance(new)[0]["passes"] == []


# --- third-party passes through the entry-point group -----------------------------------------------


def _python(*args: str, env_path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(env_path), NO_COLOR="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def _can_build_wheels() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the `wheel` package."""
    probe = "import setuptools\ntry:\n import setuptools.command.bdist_wheel\nexcept ImportError:\n import wheel"
    return (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False).returncode
        == 0
    )


def _install_by_hand(src: Path, target: Path) -> None:
    """What pip --target leaves for a one-module distribution: the module and its dist-info."""
    project = tomllib.loads((src / "pyproject.toml").read_text())
    meta = project["project"]
    for module in project["tool"]["setuptools"]["py-modules"]:
        shutil.copy(src / f"{module}.py", target)
    info = target / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items())
            for group, points in meta["entry-points"].items()
        )
    )


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """tests/plugin_dist installed into a private folder (put it on PYTHONPATH to use it)."""
    work = tmp_path_factory.mktemp("plugin")
    src = work / "src"
    shutil.copytree(
        PLUGIN_DIST, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = work / "site"
    target.mkdir()
    if _can_build_wheels():
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--disable-pip-version-check",
                "--quiet",
                "--target",
                str(target),
                str(src),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        # This environment's setuptools (< 70.1, no `wheel`) cannot build a wheel offline; lay out
        # the installed distribution as pip would, so entry-point discovery is still tested.
        _install_by_hand(src, target)
    assert list(target.glob("onnxprune_count_ops-*.dist-info/entry_points.txt"))
    return target


def test_plugin_is_listed(plugin_site, tmp_path):
    proc = _python("-m", "onnxprune", "--list-passes", env_path=plugin_site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    line = next(ln for ln in lines if ln.startswith("count-ops "))
    assert "Report how many nodes of each op type" in line
    assert "onnxprune-count-ops (onnxprune_count_ops:CountOps)" in line
    assert any(ln.strip().startswith("top: int = 0") for ln in lines)
    assert any(ln.startswith("cleanup ") for ln in lines)
    assert "UNAVAILABLE" not in proc.stdout


def test_plugin_runs_from_the_cli(plugin_site, tmp_path, model_path):
    src = model_path("tf/cnn.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = _python(
        "-m",
        "onnxprune",
        str(src),
        "-p",
        "count-ops:top=2",
        "-o",
        str(out),
        "--report",
        str(report),
        env_path=plugin_site,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    section = json.loads(report.read_text())["passes"][0]
    assert section["pass"] == "count-ops" and section["modified"] is False
    assert section["nodes"] == len(onnx.load(str(src)).graph.node)
    assert len(section["op_histogram"]) == 2
    assert onnxprune.load(out).graph == onnxprune.load(src).graph


def test_broken_plugin_is_listed_unavailable(tmp_path, model_path):
    site = tmp_path / "site"
    info = site / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[onnxprune.passes]\n"
        "broken-import = broken_plugin:Pruner\n"
        "not-a-pass = broken_plugin_ok:helper\n"
    )
    (site / "broken_plugin.py").write_text("raise ImportError('needs libfoo 9, not installed')\n")
    (site / "broken_plugin_ok.py").write_text("def helper():\n    pass\n")

    proc = _python("-m", "onnxprune", "--list-passes", env_path=site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert re.search(
        r"^broken-import  UNAVAILABLE from broken-plugin .*ImportError: needs libfoo 9", out, re.M
    )
    assert re.search(
        r"^not-a-pass  UNAVAILABLE from broken-plugin .*not a onnxprune.Pass subclass", out, re.M
    )
    assert re.search(r"^cleanup ", out, re.M)

    proc = _python(
        "-m",
        "onnxprune",
        str(model_path("tf/cnn.onnx")),
        "-p",
        "broken-import",
        env_path=site,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "broken-import" in proc.stderr and "failed to load" in proc.stderr
    proc = _python(
        "-m",
        "onnxprune",
        str(model_path("tf/cnn.onnx")),
        "-p",
        "cleanup",
        "-o",
        str(tmp_path / "ok.onnx"),
        "-q",
        env_path=site,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr  # a broken plugin does not break other passes
