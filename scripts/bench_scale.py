"""Scale benchmark (issue 14): generated models in external-data format, timed end to end.

Models (written by this script under ``--workdir``, deleted afterwards unless ``--keep``):

* ``decoder-L``: a transformer-decoder stack of L layers (d=2048, FFN 8192, 16 heads of 128,
  attention written out as MatMul/Softmax, LayerNormalization, pre-LN residual Adds, token
  embedding of 32000 x 2048); L=20 has 1.07B parameters.
* ``mlp-B``: B residual MLP blocks ``x + W2 relu(W1 x + b1) + b2`` (d=4096, hidden 16384).

Every model is written with half of each FFN's hidden neurons zeroed (so ``fold`` alone has work)
into ``model.onnx`` + ``model.onnx.data`` (tensors page-aligned, as onnxprune writes them).

Each run is a fresh child process (``python -m onnxprune ...``); its wall time, peak RSS
(``ru_maxrss`` of that child, from ``os.wait4``) and bytes written (``wchar`` of
``/proc/PID/io``, sampled until exit: a lower bound when the last writes fall after the last
sample) are recorded, and the output's size is subtracted from what was written.

    python scripts/bench_scale.py --layers 2,4,6            # development sizes
    python scripts/bench_scale.py --layers 4,8,20 --mlp 5   # the issue's sizes

The issue's targets on the 1.07B decoder, per run: peak RSS at most 1.5x the weights' bytes,
bytes written beyond the output at most 1x (docs/scale.md has the figures). On a shared
machine run it as ``flock LOCKFILE python scripts/bench_scale.py ...`` so that only one
such run at a time holds the memory.

Results are printed as a markdown table (and as JSON with ``--json FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

D, FFN, HEADS, VOCAB, SEQ = 2048, 8192, 16, 32000, 16
ALIGN = 4096


class Writer:
    """Writes tensors straight into one page-aligned external-data file (no model in memory)."""

    def __init__(self, folder: Path, seed: int) -> None:
        self.folder = folder
        self.data = open(folder / "model.onnx.data", "wb")  # noqa: SIM115 - closed in finish
        self.inits: list[TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.params = 0

    def tensor(self, name: str, arr: np.ndarray) -> str:
        """Append ``arr`` (small ones stay inline) and return its name."""
        self.params += arr.size
        if arr.nbytes < 1024:
            self.inits.append(onnx.numpy_helper.from_array(arr, name))
            return name
        offset = self.data.tell()
        offset += self.data.write(b"\0" * ((-offset) % ALIGN))
        self.data.write(np.ascontiguousarray(arr).tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", "model.onnx.data"), ("offset", offset), ("length", arr.nbytes)):
            t.external_data.add(key=k, value=str(v))
        self.inits.append(t)
        return name

    def weight(self, name: str, rows: int, cols: int, zero_cols: int = 0) -> str:
        w = (self.rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(rows)).astype(
            np.float32
        )
        if zero_cols:
            w[:, cols - zero_cols :] = 0.0
        return self.tensor(name, w)

    def vector(self, name: str, n: int, value: float | None = None, zero_tail: int = 0) -> str:
        v = (
            np.full(n, value, np.float32)
            if value is not None
            else (0.02 * self.rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
        )
        if zero_tail:
            v[n - zero_tail :] = 0.0
        return self.tensor(name, v)

    def const(self, name: str, values: list[int] | np.ndarray, dtype: Any = np.int64) -> str:
        return self.tensor(name, np.asarray(values, dtype))

    def finish(
        self,
        nodes: list[onnx.NodeProto],
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        opset: int = 17,
    ) -> Path:
        self.data.close()
        graph = helper.make_graph(nodes, "bench", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        path = self.folder / "model.onnx"
        path.write_bytes(model.SerializeToString())
        return path


def decoder(folder: Path, layers: int, seed: int = 0) -> tuple[Path, int]:
    """A pre-LN decoder stack; returns the model path and its parameter count."""
    w = Writer(folder, seed)
    hd = D // HEADS
    nodes: list[onnx.NodeProto] = []
    n = nodes.append
    w.tensor("embed", (0.02 * w.rng.standard_normal((VOCAB, D), dtype=np.float32)))
    n(helper.make_node("Gather", ["embed", "input_ids"], ["h0"]))
    split = w.const("heads_shape", [0, 0, HEADS, hd])
    merge = w.const("merge_shape", [0, 0, D])
    scale = w.const("scale", np.float32(1.0 / np.sqrt(hd)), np.float32)
    x = "h0"
    for i in range(layers):
        p = f"l{i}."
        g1, b1 = w.vector(p + "ln1.g", D, 1.0), w.vector(p + "ln1.b", D, 0.0)
        n(helper.make_node("LayerNormalization", [x, g1, b1], [p + "ln1"], axis=-1))
        heads = {}
        for part in ("q", "k", "v"):
            wt, bt = w.weight(p + part, D, D), w.vector(p + part + ".b", D)
            n(helper.make_node("MatMul", [p + "ln1", wt], [p + part + "_mm"]))
            n(helper.make_node("Add", [p + part + "_mm", bt], [p + part + "_lin"]))
            n(helper.make_node("Reshape", [p + part + "_lin", split], [p + part + "_r"]))
            perm = [0, 2, 3, 1] if part == "k" else [0, 2, 1, 3]
            n(helper.make_node("Transpose", [p + part + "_r"], [p + part + "_h"], perm=perm))
            heads[part] = p + part + "_h"
        n(helper.make_node("MatMul", [heads["q"], heads["k"]], [p + "scores"]))
        n(helper.make_node("Mul", [p + "scores", scale], [p + "scaled"]))
        n(helper.make_node("Softmax", [p + "scaled"], [p + "attn"], axis=-1))
        n(helper.make_node("MatMul", [p + "attn", heads["v"]], [p + "ctx"]))
        n(helper.make_node("Transpose", [p + "ctx"], [p + "ctx_t"], perm=[0, 2, 1, 3]))
        n(helper.make_node("Reshape", [p + "ctx_t", merge], [p + "ctx_m"]))
        wo, bo = w.weight(p + "o", D, D), w.vector(p + "o.b", D)
        n(helper.make_node("MatMul", [p + "ctx_m", wo], [p + "o_mm"]))
        n(helper.make_node("Add", [p + "o_mm", bo], [p + "o_lin"]))
        n(helper.make_node("Add", [x, p + "o_lin"], [p + "res1"]))
        g2, b2 = w.vector(p + "ln2.g", D, 1.0), w.vector(p + "ln2.b", D, 0.0)
        n(helper.make_node("LayerNormalization", [p + "res1", g2, b2], [p + "ln2"], axis=-1))
        up = w.weight(p + "up", D, FFN, zero_cols=FFN // 2)
        upb = w.vector(p + "up.b", FFN, zero_tail=FFN // 2)
        n(helper.make_node("MatMul", [p + "ln2", up], [p + "up_mm"]))
        n(helper.make_node("Add", [p + "up_mm", upb], [p + "up_lin"]))
        n(helper.make_node("Relu", [p + "up_lin"], [p + "act"]))
        down, downb = w.weight(p + "down", FFN, D), w.vector(p + "down.b", D)
        n(helper.make_node("MatMul", [p + "act", down], [p + "down_mm"]))
        n(helper.make_node("Add", [p + "down_mm", downb], [p + "down_lin"]))
        n(helper.make_node("Add", [p + "res1", p + "down_lin"], [p + "res2"]))
        x = p + "res2"
    gf, bf = w.vector("lnf.g", D, 1.0), w.vector("lnf.b", D, 0.0)
    n(helper.make_node("LayerNormalization", [x, gf, bf], ["hidden"], axis=-1))
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ])
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", SEQ, D])
    return w.finish(nodes, [ids], [out]), w.params


def mlp(
    folder: Path, blocks: int, d: int = 4096, hidden: int = 16384, seed: int = 0
) -> tuple[Path, int]:
    """Residual MLP blocks; returns the model path and its parameter count."""
    w = Writer(folder, seed)
    nodes: list[onnx.NodeProto] = []
    n = nodes.append
    x = "x"
    for i in range(blocks):
        p = f"b{i}."
        w1 = w.weight(p + "w1", d, hidden, zero_cols=hidden // 2)
        b1 = w.vector(p + "b1", hidden, zero_tail=hidden // 2)
        n(helper.make_node("Gemm", [x, w1, b1], [p + "h"]))
        n(helper.make_node("Relu", [p + "h"], [p + "a"]))
        w2, b2 = w.weight(p + "w2", hidden, d), w.vector(p + "b2", d)
        n(helper.make_node("Gemm", [p + "a", w2, b2], [p + "y"]))
        n(helper.make_node("Add", [x, p + "y"], [p + "out"]))
        x = p + "out"
    n(helper.make_node("Identity", [x], ["y"]))
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])
    yo = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])
    return w.finish(nodes, [xi], [yo]), w.params


def write_data(model: Path, samples: int, seed: int = 1) -> Path:
    """``samples`` inputs for the model (token ids, or normal features) as an .npz."""
    rng = np.random.default_rng(seed)
    light = onnx.load(str(model), load_external_data=False)
    inp = light.graph.input[0]
    if inp.type.tensor_type.elem_type == TensorProto.INT64:
        arr: np.ndarray = rng.integers(0, VOCAB, (samples, SEQ), dtype=np.int64)
    else:
        width = inp.type.tensor_type.shape.dim[1].dim_value
        arr = rng.standard_normal((samples, width), dtype=np.float32)
    path = model.parent / f"data{samples}.npz"
    np.savez(path, **{inp.name: arr})
    return path


def measure(args: list[str], output: Path | None) -> dict[str, Any]:
    """Run ``python -m onnxprune ARGS`` as a child: wall s, peak RSS, bytes written past the output."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxprune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wchar = [0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines():
                    if line.startswith("wchar:"):
                        wchar[0] = max(wchar[0], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    sampler.join()
    out_bytes = 0
    if output is not None:
        for f in (output, output.with_name(output.name + ".data")):
            if f.exists():
                out_bytes += f.stat().st_size
    return {
        "args": " ".join(args),
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "written_bytes": wchar[0],
        "output_bytes": out_bytes,
        "extra_written_bytes": max(0, wchar[0] - out_bytes),
        "tail": text.strip().splitlines()[-3:],
    }


def runs(model: Path, data: Path) -> list[tuple[str, list[str], Path | None]]:
    """The timed commands on one model (name, arguments, output file)."""
    out = model.parent / "out.onnx"
    m = str(model)
    return [
        ("summary", [m, "-q"], None),
        ("--inspect", [m, "--inspect", "-q"], None),
        (
            "vote+fold (no data)",
            [m, "-p", "vote:criteria=l1+l2", "-p", "fold", "-o", str(out), "--external-data", "-q"],
            out,
        ),
        *(
            (  # the default checks (check=lsq, select=auto), then without the check
                f"vote+fold (8 samples{label})",
                [m, "-p", f"vote:criteria=l1+l2{opt}", "-p", "fold", "--data", str(data)]
                + ["-o", str(out), "-q"],
                out,
            )
            for label, opt in (("", ""), (", check=off", ",check=off"))
        ),
        ("fold alone", [m, "-p", "fold", "-o", str(out), "--external-data", "-q"], out),
        (
            "fold + validate",
            [
                m,
                "-p",
                "fold",
                "-p",
                "validate:runs=0",
                "--data",
                str(data),
                "-o",
                str(out),
                "--external-data",
                "-q",
            ],
            out,
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,4,6", help="decoder sizes (layers), comma-separated")
    ap.add_argument("--mlp", default="", help="MLP sizes (blocks), comma-separated")
    ap.add_argument("--workdir", default="/tmp/onnxprune-bench-scale")
    ap.add_argument("--only", default="", help="run only the commands whose name contains this")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    args = ap.parse_args()
    sizes = [("decoder", int(v)) for v in args.layers.split(",") if v]
    sizes += [("mlp", int(v)) for v in args.mlp.split(",") if v]
    results: list[dict[str, Any]] = []
    work = Path(args.workdir)
    t0 = time.perf_counter()  # the start-up every run below includes (imports)
    subprocess.run([sys.executable, "-c", "import onnxprune.cli"], check=True)
    startup = round(time.perf_counter() - t0, 1)
    results.append({"run": "start-up (import onnxprune.cli)", "wall_s": startup})
    print(f"# start-up of a run (python, imports): {startup} s", flush=True)
    for kind, size in sizes:
        folder = work / f"{kind}-{size}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        model, params = (decoder if kind == "decoder" else mlp)(folder, size)
        data = write_data(model, 8)
        os.sync()  # the first run must not meet the write-back of the model just written
        weights = (folder / "model.onnx.data").stat().st_size
        print(
            f"# {kind}-{size}: {params / 1e9:.3f}B parameters, {weights / 1e9:.2f} GB "
            f"(written in {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        for name, cmd, out in runs(model, data):
            if args.only and args.only not in name:
                continue
            r = measure(cmd, out)
            r.update(model=f"{kind}-{size}", params=params, weights_bytes=weights, run=name)
            results.append(r)
            print(
                f"| {kind}-{size} | {name} | {r['rc']} | {r['wall_s']} s | "
                f"{r['peak_rss_bytes'] / weights:.2f}x | {r['extra_written_bytes'] / weights:.2f}x |",
                flush=True,
            )
            if r["rc"] != 0:
                print("   ", *r["tail"], sep="\n    ")
            if out is not None:
                for f in (out, out.with_name(out.name + ".data")):
                    f.unlink(missing_ok=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
