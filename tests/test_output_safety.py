"""Output safety: no output is, aliases or overwrites an input or another output; writes commit
together or not at all; ``--report -`` and devices; umask. Each case runs the real CLI and checks
that the inputs are byte-identical afterwards."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke as cli

import onnxprune
from onnxprune import outputs, sweep
from onnxprune.errors import ModelSaveError
from onnxprune.outputs import OutputPlan

MODELS = Path(__file__).resolve().parents[1] / "models"


def one_line_error(result, *expected: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: "), err
    for text in expected:
        assert text in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file bytes, or ``link -> target``, or ``dir``."""
    found: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            found[rel] = f"link -> {os.readlink(p)}"
        elif p.is_dir():
            found[rel] = "dir"
        elif p.is_file():
            found[rel] = p.read_bytes()
        else:
            found[rel] = "special"
    return found


@pytest.fixture
def cnn(tmp_path) -> Path:
    return Path(shutil.copy(MODELS / "tf/cnn.onnx", tmp_path / "cnn.onnx"))


@pytest.fixture
def external(tmp_path) -> Path:
    """tf/mlp saved as ``m.onnx`` with its weights in ``m.onnx.data``."""
    model = onnxprune.load(MODELS / "tf/mlp.onnx")
    path = onnxprune.save(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > 10_000
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, **{"input": np.zeros((2, 64), np.float32)})
    return path


# --- outputs that are inputs ---------------------------------------------------------------------


def test_report_equal_to_the_input_model(cnn, tmp_path):
    before = snapshot(tmp_path)
    one_line_error(
        cli(cnn, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--report", cnn),
        f"--report {cnn}: refusing to overwrite the input model",
        "choose another --report",
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("spelling", ["plain", "relative", "symlink", "hardlink"])
def test_output_equal_to_the_input_external_data(external, tmp_path, monkeypatch, spelling):
    data_file = tmp_path / "m.onnx.data"
    out = {"plain": data_file, "relative": Path("./sub/../m.onnx.data")}.get(spelling)
    what = "the input model's external data"
    if spelling == "symlink":
        out = tmp_path / "link.onnx"
        out.symlink_to(data_file)
    elif spelling == "hardlink":  # onnx will not read a data file with two links: the model's
        out, what = tmp_path / "hard.onnx", "the input model"
        os.link(external, out)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    one_line_error(
        cli(external, "-p", "cleanup", "-o", out), f"-o {out}: refusing to overwrite {what}"
    )
    assert snapshot(tmp_path) == before


def test_external_data_output_onto_the_input_weights(tmp_path, run_ort, same_outputs):
    """a.onnx reads b.onnx.data: ``-o b.onnx --external-data`` would write over its weights."""
    model = onnxprune.load(MODELS / "tf/mlp.onnx")
    onnxprune.save(model, tmp_path / "b.onnx", external_data=True)
    (tmp_path / "b.onnx").rename(tmp_path / "a.onnx")
    src = tmp_path / "a.onnx"
    before = snapshot(tmp_path)
    for flag in ("--external-data", None):  # by default a large model may need external data
        args = [src, "-p", "cleanup", "-o", tmp_path / "b.onnx"] + ([flag] if flag else [])
        one_line_error(
            cli(*args),
            f"-o {tmp_path / 'b.onnx'} (its external data {tmp_path / 'b.onnx.data'})",
            "refusing to overwrite the input model's external data",
        )
        assert snapshot(tmp_path) == before
    result = cli(src, "-p", "cleanup", "-o", tmp_path / "b.onnx", "--no-external-data")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "b.onnx.data").read_bytes() == before["b.onnx.data"]
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    same_outputs(run_ort(onnxprune.load(src), feeds), run_ort(model, feeds))


def test_output_equal_to_the_data_file(cnn, data, tmp_path):
    before = snapshot(tmp_path)
    one_line_error(
        cli(cnn, "-p", "cleanup", "--data", data, "-o", data),
        f"-o {data}: refusing to overwrite the --data file",
    )
    one_line_error(
        cli(cnn, "-p", "cleanup", "--data", data, "--report", data), "--report", "--data file"
    )
    assert snapshot(tmp_path) == before


def test_output_equal_to_the_recipe(cnn, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('output = "r.toml"\n[[pass]]\nname = "cleanup"\n')
    before = snapshot(tmp_path)
    one_line_error(cli(cnn, "--recipe", recipe), "refusing to overwrite the recipe")
    assert snapshot(tmp_path) == before


# --- outputs that are each other -----------------------------------------------------------------


def test_report_equal_to_the_output_model(cnn, tmp_path):
    out = tmp_path / "o.onnx"
    before = snapshot(tmp_path)
    one_line_error(
        cli(cnn, "-p", "cleanup", "-o", out, "--report", out),
        f"-o {out}: is the same file as --report {out}",
        "give each output its own path",
    )
    one_line_error(
        cli(cnn, "-p", "cleanup", "-o", out, "--external-data", "--report", f"{out}.data"),
        f"-o {out} (its external data {out}.data): is the same file as --report",
    )
    assert snapshot(tmp_path) == before


def test_sweep_outputs_that_collide(tmp_path):
    src = Path(shutil.copy(MODELS / "tf/mlp.onnx", tmp_path / "mlp.onnx"))
    sweep = ["-p", "cleanup", "--sweep", "8,16", "--sweep-key", "fold_limit_mb"]
    before = snapshot(tmp_path)
    point = tmp_path / "pts" / "mlp.fold_limit_mb-16.onnx"
    one_line_error(
        cli(src, *sweep, "-o", tmp_path / "pts", "--report", point),
        f"-o {point}: is the same file as --report",
    )
    plot = tmp_path / "p.png"
    one_line_error(
        cli(src, *sweep, "--plot", plot, "--report", plot), "--plot", "is the same file as --report"
    )
    assert snapshot(tmp_path) == before


# --- all or nothing ------------------------------------------------------------------------------


def test_missing_report_folder_fails_before_any_work(cnn, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr("onnxprune.commands.run", no_work)
    before = snapshot(tmp_path)
    one_line_error(
        cli(cnn, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--report", tmp_path / "no/r.json"),
        f"--report {tmp_path / 'no/r.json'}: output folder",
        "does not exist; create it or choose another --report",
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_rename_undoes_the_others(cnn, tmp_path, monkeypatch, existing):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    if existing:
        out.write_bytes(b"old model")
        report.write_text("old report")
    before = snapshot(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == report:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    one_line_error(
        cli(cnn, "-p", "cleanup", "-o", out, "--report", report),
        f"--report {report}: cannot write the report: No space left on device",
    )
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # the model is back as it was (or gone), no temp files


def test_a_failed_sweep_leaves_no_folder_and_no_points(tmp_path, monkeypatch):
    src = Path(shutil.copy(MODELS / "tf/mlp.onnx", tmp_path / "mlp.onnx"))

    def full_disk(report, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("onnxprune.commands.write_plot", full_disk)
    before = snapshot(tmp_path)
    args = ["-p", "cleanup", "--sweep", "8,16", "--sweep-key", "fold_limit_mb"]
    one_line_error(
        cli(src, *args, "-o", tmp_path / "pts", "--plot", tmp_path / "p.png"),
        f"--plot {tmp_path / 'p.png'}: cannot write the plot: No space left",
    )
    assert snapshot(tmp_path) == before
    result = cli(src, *args, "-o", tmp_path / "pts", "--report", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "pts").iterdir()) == [
        "mlp.fold_limit_mb-16.onnx",
        "mlp.fold_limit_mb-8.onnx",
    ]
    assert {p.name for p in tmp_path.iterdir()} == {"mlp.onnx", "pts", "r.json"}


# --- stdout, devices, symlinks, modes ------------------------------------------------------------


def test_report_dash_is_json_on_stdout_alone(cnn, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["-q"]):
        result = cli(cnn, "-p", "cleanup", "-o", "o.onnx", "--report", "-", *extra)
        assert result.exit_code == 0, result.stderr
        report = json.loads(result.stdout)  # nothing else on stdout
        assert report["output"] == "o.onnx" and report["schema"] == 2
        if not extra:
            assert "DONE (no gates checked" in result.stderr and "cleanup" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "o.onnx"]  # no file "-"


def test_recipe_report_dash_is_stdout(cnn, tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    recipe = tmp_path / "r" / "r.toml"
    recipe.write_text('report = "-"\noutput = "o.onnx"\n[[pass]]\nname = "cleanup"\n')
    result = cli(cnn, "--recipe", recipe)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "r" / "o.onnx")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["o.onnx", "r.toml"]


def test_report_dev_stdout_in_process(cnn, tmp_path):
    result = cli(cnn, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--report", "/dev/stdout")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "o.onnx")
    assert Path("/dev/stdout").is_symlink() or not Path("/dev/stdout").is_file()


def test_report_to_a_symlink_of_dev_stdout_in_a_real_process(cnn, tmp_path):
    if not Path("/dev/stdout").exists():
        pytest.skip("no /dev/stdout")
    link = tmp_path / "stdout"
    link.symlink_to("/dev/stdout")
    argv = [sys.executable, "-m", "onnxprune", cnn, "-p", "cleanup", "-o", tmp_path / "o.onnx"]
    done = subprocess.run(
        [str(a) for a in [*argv, "--report", link]], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == str(tmp_path / "o.onnx")
    assert "DONE (no gates checked" in done.stderr
    assert link.is_symlink() and os.readlink(link) == "/dev/stdout"


@pytest.mark.parametrize("via_link", [False, True])
def test_report_into_a_fifo(cnn, tmp_path, via_link):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = fifo
    if via_link:
        target = tmp_path / "link"
        target.symlink_to(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = cli(cnn, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--report", target)
    reader.join(timeout=30)
    assert result.exit_code == 0, result.stderr
    assert json.loads(got[0])["output"] == str(tmp_path / "o.onnx")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not via_link or target.is_symlink()


def test_what_is_written_in_place(tmp_path):
    """FIFOs, devices and descriptor links are written into; regular files are replaced."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_text("x")
    (tmp_path / "err").symlink_to("/dev/stderr")
    plan = OutputPlan()
    assert plan.add_output("--report", tmp_path / "fifo", "report").in_place
    assert not plan.add_output("--report", tmp_path / "file", "report").in_place
    assert not plan.add_output("--report", tmp_path / "new", "report").in_place
    if Path("/dev/stderr").exists():
        assert plan.add_output("--report", tmp_path / "err", "report").in_place
    if Path("/dev/null").exists():
        assert plan.add_output("--report", "/dev/null", "report").in_place
    with pytest.raises(ModelSaveError, match="external data needs a regular file"):
        plan.add_model("-o", tmp_path / "fifo", external_data=True)
    if Path("/dev/null").exists():  # two outputs may both go to a character device
        plan = OutputPlan()
        plan.add_model("-o", "/dev/null", external_data=None)
        plan.add_output("--report", "/dev/null", "report")
        plan.check()


def test_a_symlinked_output_is_written_through(cnn, tmp_path):
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "r.json"
    real.write_text("old")
    (tmp_path / "r.json").symlink_to(real)
    result = cli(cnn, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "r.json").is_symlink() and json.loads(real.read_text())["schema"] == 2


def test_new_outputs_get_the_umask_and_replaced_ones_keep_their_mode(external, tmp_path):
    old = os.umask(0o027)
    try:
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o604)
        out = tmp_path / "o.onnx"
        result = cli(external, "-p", "cleanup", "-o", out, "--external-data", "--report", kept)
        assert result.exit_code == 0, result.stderr
        result = cli(
            external, "-p", "cleanup", "-o", tmp_path / "p.onnx", "--report", tmp_path / "r.json"
        )
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    for name in ("o.onnx", "o.onnx.data", "p.onnx", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604


# --- the Python API ------------------------------------------------------------------------------


def test_save_refuses_the_loaded_model_external_data(external, tmp_path):
    model = onnxprune.load(external)
    before = snapshot(tmp_path)
    new, _ = onnxprune.run(model, ["cleanup"])
    for m in (model, new):
        with pytest.raises(ModelSaveError, match="refusing to overwrite the external data of"):
            onnxprune.save(m, tmp_path / "m.onnx.data")
        with pytest.raises(ModelSaveError, match=r"\(its external data .*x.onnx.data\)"):
            os.link(tmp_path / "m.onnx.data", tmp_path / "x.onnx.data")
            try:
                onnxprune.save(m, tmp_path / "x.onnx", external_data=True)
            finally:
                (tmp_path / "x.onnx.data").unlink()
    assert snapshot(tmp_path) == before
    onnxprune.save(model, external, external_data=True)  # rewriting the model itself is fine
    assert onnxprune.load(external).graph == model.graph


def test_plan_refuses_an_output_that_is_a_folder_or_in_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    plan = OutputPlan()
    plan.add_output("--report", tmp_path / "f" / "r.json", "report")
    with pytest.raises(ModelSaveError, match="does not exist"):
        plan.check()
    plan = OutputPlan()
    plan.add_folder("-o", tmp_path / "f")
    with pytest.raises(ModelSaveError, match="is a file, not a folder"):
        plan.check()
    assert outputs.is_stdout("-") and not outputs.is_stdout(tmp_path / "f")


def test_sweep_report_dash_and_a_bad_plot_suffix(tmp_path, monkeypatch):
    src = Path(shutil.copy(MODELS / "tf/mlp.onnx", tmp_path / "mlp.onnx"))
    monkeypatch.chdir(tmp_path)
    args = [src, "-p", "cleanup", "--sweep", "8,16", "--sweep-key", "fold_limit_mb"]
    result = cli(*args, "--report", "-")
    assert result.exit_code == 0, result.stderr
    assert [p["value"] for p in json.loads(result.stdout)["points"]] == [8.0, 16.0]
    assert "sweep of fold_limit_mb" in result.stderr
    one_line_error(cli(*args, "--plot", "p.txt"), "--plot p.txt: matplotlib cannot write .txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_run_sweep_saves_all_points_or_none(tmp_path, monkeypatch):
    src = Path(shutil.copy(MODELS / "tf/mlp.onnx", tmp_path / "mlp.onnx"))
    model, chain = onnxprune.load(src), [onnxprune.get_pass("cleanup")()]
    calls = []
    real_run = sweep.run

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise onnxprune.OnnxPruneError("pass cleanup: boom")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(sweep, "run", fails_second)
    with pytest.raises(onnxprune.OnnxPruneError, match="boom"):
        sweep.run_sweep(
            model, chain, [8, 16], "fold_limit_mb", model_path=src, save_to=tmp_path / "pts"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]
    monkeypatch.undo()
    report = sweep.run_sweep(
        model, chain, [8, 16], "fold_limit_mb", model_path=src, save_to=tmp_path / "pts"
    )
    assert [Path(p["output"]).name for p in report["points"]] == [
        "mlp.fold_limit_mb-8.onnx",
        "mlp.fold_limit_mb-16.onnx",
    ]
    assert sorted(p.name for p in (tmp_path / "pts").iterdir()) == [
        "mlp.fold_limit_mb-16.onnx",
        "mlp.fold_limit_mb-8.onnx",
    ]
