"""Quality of structured pruning without fine-tuning: accuracy and recall against sparsity.

    .venv/bin/python scripts/bench_quality.py                 # all digits models, full grid
    .venv/bin/python scripts/bench_quality.py --quick         # fewer points, for a smoke run
    .venv/bin/python scripts/bench_quality.py --targets       # issue 11's targets only

``--targets`` measures issue 11's targets and rewrites only the "Targets" section of
docs/quality.md (between its markers): the digits CNNs in budget mode (calibrated on the first
half of the held-back test split, judged on the second, checked again on the calibration split
no step saw), the random MLP at half its hidden neurons, a random residual CNN with the
residual stream pruned at 50% and, when models/real/minilm.onnx exists
(scripts/fixtures/export_minilm.py), a trained sentence encoder.

For each trained digits model (models/digits/, calibration and held-back test splits), each
criterion alone, the vote and the average are run at sparsity 0.1 ... 0.7, in three variants:
zeros only, with bias compensation, and with compensation + refit; each result is folded.
Prints a table (accuracy, macro recall, MAC ratio, latency ratio for the vote rows) and writes
docs/quality.md and docs/quality.png. Also reports the output cosine of a random-weight MLP
512-2048-2048-512 pruned at half its hidden neurons (the peer reference point).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.cost import summarize
from onnxprune.runtime import session

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
CRITERIA = ["l1", "l2", "bn", "consumer", "act_var", "apoz", "flap", "wanda", "random"]
VARIANTS = {"zeros": "compensate=off", "comp": "compensate=on", "comp+refit": "compensate=on"}


def accuracy(model: onnx.ModelProto, test: Path) -> tuple[float, float]:
    """Top-1 accuracy and macro recall on a labelled .npz split."""
    with np.load(test) as d:
        data = {k: d[k] for k in d.files}
    labels = data.pop("labels")
    sess = session(model)
    name = sess.get_inputs()[0].name
    pred = sess.run(None, {name: data[name]})[0].argmax(-1)
    recall = np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)])
    return float((pred == labels).mean()), float(recall)


def chain(method: str, sparsity: float, variant: str) -> list[str]:
    """The pass chain for one grid point."""
    opts = f"sparsity={sparsity},{VARIANTS[variant]}"
    if method == "vote":
        first = f"vote:{opts}"
    elif method == "average":
        first = f"vote:{opts},mode=average"
    else:
        first = f"vote:{opts},criteria={method},quorum=1,check=off"
    return [first] + (["refit"] if variant == "comp+refit" else []) + ["fold"]


def latency_ratio(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, runs: int = 50) -> float:
    """Median latency of b over a, interleaved, one thread."""
    import statistics
    import time

    sa, sb = session(a, threads=1), session(b, threads=1)
    ta, tb = [], []
    for i in range(runs + 5):
        for s, t in ((sa, ta), (sb, tb)):
            start = time.perf_counter()
            s.run(None, feeds)
            if i >= 5:
                t.append(time.perf_counter() - start)
    return statistics.median(tb) / statistics.median(ta)


def bench_model(name: str, sparsities: list[float], methods: list[str]) -> list[dict]:
    """Every grid point for one digits model."""
    path = DIGITS / f"{name}.onnx"
    calib, test = DIGITS / f"{name}.calib.npz", DIGITS / f"{name}.test.npz"
    base, _ = onnxprune.run(onnxprune.load(path), ["cleanup"], device="cpu")
    acc0, rec0 = accuracy(base, test)
    macs0 = summarize(base).macs
    with np.load(test) as d:
        feeds = {k: d[k][:32] for k in d.files if k != "labels"}
    rows = [
        {
            "model": name,
            "method": "original",
            "variant": "-",
            "sparsity": 0.0,
            "accuracy": acc0,
            "recall": rec0,
            "mac_ratio": 1.0,
            "latency_ratio": 1.0,
        }
    ]
    for sparsity in sparsities:
        for method in methods:
            for variant in VARIANTS:
                pruned, _ = onnxprune.run(
                    base, chain(method, sparsity, variant), data=calib, device="cpu"
                )
                acc, rec = accuracy(pruned, test)
                row = {
                    "model": name,
                    "method": method,
                    "variant": variant,
                    "sparsity": sparsity,
                    "accuracy": acc,
                    "recall": rec,
                    "mac_ratio": summarize(pruned).macs / macs0,
                    "latency_ratio": None,
                }
                if method == "vote" and variant == "comp+refit":
                    row["latency_ratio"] = latency_ratio(base, pruned, feeds)
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    lat = f"{r['latency_ratio']:.2f}" if r["latency_ratio"] is not None else "-"
    return (
        f"{r['model']:14} {r['method']:9} {r['variant']:11} {r['sparsity']:4.2f} "
        f"acc {r['accuracy']:.4f} recall {r['recall']:.4f} MACs {r['mac_ratio']:.3f} "
        f"latency {lat}"
    )


def mlp_cosine() -> dict[str, float]:
    """Random MLP 512-2048-2048-512, half the hidden neurons: output cosine on held-out data."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import tempfile

    from bench_fold import mlp

    model = mlp([512, 2048, 2048, 512], "gemm")
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((8192, 512)).astype(np.float32)
    held = rng.standard_normal((512, 512)).astype(np.float32)
    ref = session(model).run(None, {"x": held})[0]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "calib.npz"
        np.savez(data, x=calib)
        for label, passes in (
            ("l1, no data", ["vote:criteria=l1,quorum=1,check=off,sparsity=0.5", "fold"]),
            ("vote + compensation", ["vote:sparsity=0.5,compensate=on", "fold"]),
            (
                "vote + compensation + refit",
                ["vote:sparsity=0.5,compensate=on", "refit:max_batches=1000", "fold"],
            ),
        ):
            pruned, _ = onnxprune.run(model, passes, data=data, device="cpu")
            y = session(pruned).run(None, {"x": held})[0]
            cos = (ref * y).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(y, axis=1))
            out[label] = float(cos.mean())
            print(
                f"MLP 512-2048-2048-512, half hidden: {label}: cosine {cos.mean():.3f}, "
                f"params {summarize(pruned).parameters:,}",
                flush=True,
            )
    return out


def write_docs(rows: list[dict], cosines: dict[str, float], command: str) -> None:
    """docs/quality.md (tables) and docs/quality.png (accuracy against MACs)."""
    lines = [
        "# Pruning quality without fine-tuning",
        "",
        f"Command: `{command}` (2-core CPU, onnxruntime CPU). Each point: the chain, then "
        "fold; accuracy and macro recall on the held-back digits test split; MAC ratio "
        "pruned/original; latency ratio (one thread, interleaved medians) for vote rows.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [
            f"## {model}",
            "",
            "| method | variant | sparsity | accuracy | recall | MAC ratio | latency ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["model"] == model:
                lat = f"{r['latency_ratio']:.2f}" if r["latency_ratio"] is not None else ""
                lines.append(
                    f"| {r['method']} | {r['variant']} | {r['sparsity']:.1f} | "
                    f"{r['accuracy']:.4f} | {r['recall']:.4f} | {r['mac_ratio']:.3f} "
                    f"| {lat} |"
                )
        lines.append("")
    lines += [
        "## Random MLP 512-2048-2048-512 at half its hidden neurons",
        "",
        "| chain | output cosine |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in cosines.items()]
    (ROOT / "docs" / "quality.md").write_text("\n".join(lines) + "\n")
    _plot(rows)


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for method in ("vote", "average", "flap", "l1", "random"):
            for variant, style in (("zeros", ":"), ("comp+refit", "-")):
                pts = sorted(
                    (r["mac_ratio"], r["accuracy"])
                    for r in rows
                    if r["model"] == model and r["method"] == method and r["variant"] == variant
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        style,
                        marker="o",
                        ms=3,
                        label=f"{method} {variant}",
                    )
        ax.set_title(model)
        ax.set_xlabel("MAC ratio (pruned / original)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "quality.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 sparsities, 4 methods")
    parser.add_argument("--models", default="torch_cnn,keras_cnn,torch_encoder")
    parser.add_argument("--targets", action="store_true", help="issue 11's targets only")
    parser.add_argument("--only", default="digits,mlp,residual,encoder", help="with --targets")
    parser.add_argument(
        "--rows", default="", help="with --targets: re-measure only the cosine rows matching this"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.targets:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_targets import targets

        targets("python scripts/bench_quality.py --targets", args.only, args.rows)
        return
    sparsities = [0.25, 0.5, 0.7] if args.quick else [round(0.1 * i, 1) for i in range(1, 8)]
    methods = (
        ["vote", "average", "flap", "random"] if args.quick else ["vote", "average", *CRITERIA]
    )
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, sparsities, methods)
    cosines = mlp_cosine()
    write_docs(
        rows, cosines, "python scripts/bench_quality.py" + (" --quick" if args.quick else "")
    )


if __name__ == "__main__":
    main()
