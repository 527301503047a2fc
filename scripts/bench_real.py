"""Prune every real-world fixture (models/real/) with the default chain and tabulate the result.

For each fixture with a calibration file: the calibration samples are split in two halves, the
first calibrates (``--data``), the second evaluates (``--eval-data``); the chain is
``cleanup -> vote (defaults) -> fold -> validate`` (gates off: this measures, it does not
judge). The table gives parameters and MACs before and after, the lowest mean cosine over the
outputs on the evaluation half, the latency ratio (median, interleaved runs) and, when
nothing was removed, the first reason vote gives.

    python scripts/bench_real.py [--runs 50] [--out docs/real-models.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime

import onnxprune

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "models" / "real"
NOTES = "Reading the table"
MARKS = ("const/", "axes/")  # arrays kept whole (an input may have a '/' in its name)


def split(calib: Path, folder: Path) -> tuple[Path, Path]:
    """Two .npz files: the first and the second half of the samples (markers kept whole)."""
    with np.load(calib) as npz:
        arrays = {k: npz[k] for k in npz.files}
    samples = next(len(v) for k, v in arrays.items() if not k.startswith(MARKS) and v.ndim)
    half = max(1, samples // 2)
    parts = []
    for name, lo, hi in (("calib", 0, half), ("eval", half, samples)):
        part = {
            k: (v if k.startswith(MARKS) or not v.ndim else v[lo:hi]) for k, v in arrays.items()
        }
        path = folder / f"{calib.stem}.{name}.npz"
        np.savez(path, **part)
        parts.append(path)
    return parts[0], parts[1]


def measure(model_path: Path, calib: Path, runs: int) -> dict:
    """One fixture through the chain; the figures of one table row."""
    with tempfile.TemporaryDirectory() as tmp:
        data, eval_data = split(calib, Path(tmp))
        model = onnxprune.load(model_path)
        chain = ["cleanup", "vote", "fold", f"validate:gates=off,runs={runs}"]
        _, report = onnxprune.run(model, chain, data=data, eval_data=eval_data, device="cpu")
    sections = {s["pass"]: s for s in report["passes"]}
    vote, fold, val = sections["vote"], sections["fold"], sections["validate"]
    shortfall = vote.get("shortfall") or []
    return {
        "params": (report["before"]["parameters"], report["after"]["parameters"]),
        "macs": (report["before"]["macs"], report["after"]["macs"]),
        "removed": fold["channels_removed"],
        "cosine": min(
            (o["cosine"] for o in val["outputs"] if o.get("cosine") is not None), default=None
        ),
        "latency": (val.get("latency") or {}).get("ratio"),
        "verified": fold.get("verified", ""),
        "why": shortfall[0]["reason"] if shortfall and not fold["channels_removed"] else "",
    }


def row(name: str, m: dict) -> str:
    (p0, p1), (c0, c1) = m["params"], m["macs"]
    cos = "n/a" if m["cosine"] is None else f"{m['cosine']:.4f}"
    lat = "n/a" if m["latency"] is None else f"{m['latency']:.2f}"
    exact = "yes" if m["verified"].startswith("outputs equal") else m["verified"][:40]
    why = m["why"].replace("|", "/")[:90]
    return (
        f"| {name} | {p0} -> {p1} ({p1 / p0:.2f}) | {c0} -> {c1} ({c1 / c0 if c0 else 0:.2f}) "
        f"| {m['removed']} | {exact} | {cos} | {lat} | {why} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="timed runs per model for latency")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "real-models.md")
    args = ap.parse_args()
    manifest = json.loads((REAL / "MANIFEST.json").read_text())
    lines = [
        "| fixture | parameters (ratio) | MACs per sample (ratio) | channels removed | fold exact "
        "| lowest cosine (eval half) | latency ratio | first reason when nothing went |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in sorted(manifest.items()):
        if not entry.get("calib"):
            continue
        m = measure(REAL / entry["file"], REAL / entry["calib"], args.runs)
        lines.append(row(name, m))
        print(lines[-1], flush=True)
    header = (
        "# Real-world fixtures: the default chain\n\n"
        "Command: `python scripts/bench_real.py` (cleanup, vote with its defaults, fold, "
        "validate with gates off; calibration on the first half of each fixture's calibration "
        "samples, evaluation on the second half).\n\n"
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python "
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__} (CPU). Latency "
        "ratios of models this small are dominated by per-node overhead.\n\n"
    )
    old = args.out.read_text() if args.out.exists() else ""
    notes = old[old.index(NOTES) :] if NOTES in old else ""  # the hand-written reading stays
    args.out.write_text(header + "\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
