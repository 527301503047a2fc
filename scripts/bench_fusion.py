"""Benchmark model fusion on digits: members, output ensembles, weight-space merges, fuse pass.

    .venv/bin/python scripts/bench_fusion.py                   # print the tables
    .venv/bin/python scripts/bench_fusion.py --doc docs/fusion.md   # and write the doc

Accuracy on the held-back test split (``<model>.test.npz``; every digits model shares the split,
so the labels are the same), MACs per sample from ``onnxprune.cost``. Rows:

* each member (torch CNN and its seeds, Keras CNN, torch encoder and its seeds);
* output ensembles computed here in numpy: the mean of the members' probabilities (softmax of
  logits; a member whose rows already sum to 1 is taken as it is), MACs the members' sum;
* weight-space merges of the torch CNN seeds (``onnxprune.fusion.weights.merge_weights``), with
  and without channel alignment: one member's MACs;
* when the ``fuse`` pass is registered: the fused ensemble made by the CLI, and the chain
  "member selection + vote + fold" (``--chain``), run on the calibration split
  (``--data``) and evaluated here on the test split. Without it those rows say so.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.cost import summarize
from onnxprune.data import load_npz
from onnxprune.fusion.weights import merge_weights
from onnxprune.passes.registry import available_passes
from onnxprune.runtime import session

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
CNN_SEEDS = ["torch_cnn", "torch_cnn_seed1", "torch_cnn_seed2", "torch_cnn_seed3"]
MEMBERS = [
    *CNN_SEEDS,
    "keras_cnn",
    "keras_cnn_seed1",
    "torch_encoder",
    "torch_encoder_seed1",
    "torch_encoder_seed2",
]
CROSS = ["torch_cnn", "keras_cnn", "torch_encoder"]
DEFAULT_SELECT = "fuse:members={members},combine=mean,select=forward,max_macs={max_macs}"
DEFAULT_CHAIN = [
    DEFAULT_SELECT,
    "vote:max_accuracy_drop=0.005,confidence=0.9,sparsity=0.9,round_to=1,judge=refit",
    "refit",
    "fold",
]
# the other selection rows: a 1-point vote budget after the same selection, accuracy
# selection without a MAC budget (the chain before issue 13's budget), and twice the budget
# for the members, then vote's MAC target
OTHER_CHAINS = {
    "after selection within the budget + vote (1 point, 90% margin) + refit + fold": [
        DEFAULT_SELECT,
        "vote:max_accuracy_drop=0.01,confidence=0.9,sparsity=0.9,round_to=1,judge=refit",
        "refit",
        "fold",
    ],
    "after accuracy selection + vote + fold (no MAC budget)": [
        "fuse:members={members},combine=mean,select=forward",
        "vote:max_accuracy_drop=0.01,sparsity=0.9,round_to=1",
        "fold",
    ],
    "after selection within 2x the budget + vote to the MAC budget + refit + fold": [
        "fuse:members={members},combine=mean,select=forward,max_macs={max_macs2}",
        "vote:max_macs={max_macs},sparsity=0.9,round_to=1,judge=refit",
        "refit",
        "fold",
    ],
}
JUDGE_ROWS = 180  # the selection row: test rows [0, 180) judge (--eval-data), the rest evaluate


@dataclass
class Row:
    """One line of a table: what, accuracy on the test split, MACs per sample, parameters."""

    name: str
    accuracy: float | None
    macs: int | None
    params: int | None
    note: str = ""

    def markdown(self) -> str:
        acc = "-" if self.accuracy is None else f"{self.accuracy:.4f}"
        macs = "-" if self.macs is None else f"{self.macs:,}"
        params = "-" if self.params is None else f"{self.params:,}"
        return f"| {self.name} | {acc} | {macs} | {params} | {self.note} |"


def split_of(name: str) -> str:
    """The model whose calib/test files ``name`` uses (seeds share seed 0's)."""
    return name.split("_seed")[0]


def test_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(input, labels) of the held-back test split for model ``name``."""
    with np.load(DIGITS / f"{split_of(name)}.test.npz") as npz:
        return npz["input"], npz["labels"]


def probabilities(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's class probabilities on ``x``: softmax of its output unless rows already
    are probabilities."""
    sess = session(model)
    out = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], dtype=np.float64)
    if (out >= 0).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
        return out
    z = np.exp(out - out.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def cost(model: onnx.ModelProto) -> tuple[int, int]:
    """(MACs per sample, parameters) from onnxprune.cost."""
    s = summarize(model)
    return s.macs, s.parameters


def members_rows(
    names: list[str],
) -> tuple[list[Row], dict[str, np.ndarray], np.ndarray]:
    """A row per member, each member's test probabilities, and the labels."""
    rows, probs = [], {}
    labels = None
    for n in names:
        model = onnxprune.load(DIGITS / f"{n}.onnx")
        x, y = test_split(n)
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise SystemExit(f"{n}: test labels differ from {names[0]}'s")
        probs[n] = probabilities(model, x)
        macs, params = cost(model)
        rows.append(Row(n, float(np.mean(probs[n].argmax(1) == y)), macs, params))
    assert labels is not None
    return rows, probs, labels


def ensemble_row(
    title: str, names: list[str], probs: dict[str, np.ndarray], labels: np.ndarray, rows: list[Row]
) -> Row:
    """Mean of the members' probabilities, computed here; MACs and parameters summed."""
    by_name = {r.name: r for r in rows}
    mean = np.mean([probs[n] for n in names], axis=0)
    return Row(
        title,
        float(np.mean(mean.argmax(1) == labels)),
        sum(by_name[n].macs or 0 for n in names),
        sum(by_name[n].params or 0 for n in names),
        "mean of softmax, numpy",
    )


def merge_rows(seeds: list[str], labels: np.ndarray) -> tuple[list[Row], list[dict]]:
    """Weight-space merges of the first 3 and of all ``seeds``, with and without alignment,
    with and without REPAIR on the calibration split; the statistics of
    the aligned merge of all seeds comes last."""
    models = [onnxprune.load(DIGITS / f"{n}.onnx") for n in seeds]
    x, _ = test_split(seeds[0])
    calib = load_npz(DIGITS / f"{split_of(seeds[0])}.calib.npz", models[0])
    rows, stats = [], []
    plans = [
        ("weights", False, False, "plain mean, no alignment"),
        ("weights", True, False, "weight matching"),
        ("weights", False, True, "plain mean, no alignment; REPAIR on calib"),
        ("weights", True, True, "weight matching; REPAIR on calib"),
        ("activations", True, False, "activation matching on calib"),
        ("activations", True, True, "activation matching on calib; REPAIR on calib"),
    ]
    for count in sorted({3, len(seeds)}):
        for match, align, fix, note in plans:
            merged, st = merge_weights(
                models[:count],
                align,
                names=seeds[:count],
                data=calib if fix or match == "activations" else None,
                match=match,  # type: ignore[arg-type]
                repair_with_data=fix,
            )
            onnx.checker.check_model(merged, full_check=True)
            acc = float(np.mean(probabilities(merged, x).argmax(1) == labels))
            macs, params = cost(merged)
            if align:
                before = np.mean([np.mean(s["correlation_before"]) for s in st["sets"]])
                after = np.mean([np.mean(s["correlation_after"]) for s in st["sets"]])
                note += f" (weight correlation {before:.3f} -> {after:.3f})"
            title = f"weight merge of {count} torch_cnn seeds"
            rows.append(Row(title, acc, macs, params, note))
            if align and not fix and match == "weights":
                stats.append(st)
    return rows, stats


def fuse_available() -> bool:
    """Whether a ``fuse`` pass is registered (issue 13's ensemble pass)."""
    return "fuse" in available_passes()


def run_cli(chain: list[str], out: Path, judge: Path | None = None) -> str:
    """``onnxprune torch_cnn.onnx -p ... --data torch_cnn.calib.npz [--eval-data judge] -o out
    --report out.json``; '' or the error."""
    argv = [sys.executable, "-m", "onnxprune", str(DIGITS / "torch_cnn.onnx")]
    for p in chain:
        argv += ["-p", p]
    argv += ["--data", str(DIGITS / "torch_cnn.calib.npz"), "-o", str(out), "-q"]
    argv += ["--report", str(out.with_suffix(".json"))]
    if judge is not None:
        argv += ["--eval-data", str(judge)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return ""


def mac_budget(rows: list[Row]) -> int:
    """The MAC budget of the selection rows, from costs alone (no accuracy seen): the
    cheapest CNN member's MACs per sample."""
    return min(r.macs or 0 for r in rows if "cnn" in r.name)


def fused_rows(
    chain: list[str], labels: np.ndarray, budget: int
) -> tuple[list[Row], list[str], list[dict]]:
    """The fuse pass's ensemble (combine=mean), the selection rows (``chain`` first, then
    :data:`OTHER_CHAINS`), the weight merge, each evaluated on the test split; the commands
    run, and the selection row's per-member report (``selection.members``)."""
    members = "+".join(
        str(DIGITS / f"{n}.onnx") for n in MEMBERS[1:] if (DIGITS / f"{n}.onnx").exists()
    )
    x, y = test_split("torch_cnn")
    seeds = "+".join(str(DIGITS / f"{n}.onnx") for n in CNN_SEEDS[1:])
    fill = {"members": members, "max_macs": budget, "max_macs2": 2 * budget}
    plans = [
        ("fused via the fuse pass (combine=mean)", [f"fuse:members={members},combine=mean"]),
        ("after member selection + vote + fold", [p.format(**fill) for p in chain]),
        *((t, [p.format(**fill) for p in c]) for t, c in OTHER_CHAINS.items()),
        (
            f"fuse:combine=weights of {len(CNN_SEEDS)} torch_cnn seeds (align=on)",
            [f"fuse:members={seeds},combine=weights,align=on"],
        ),
    ]
    if not fuse_available():
        rows = [Row(t, None, None, None, "not run: no fuse pass registered") for t, _ in plans]
        return rows, [], []
    rows, commands, picked = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        judge = Path(tmp) / "judge.npz"
        np.savez(judge, input=x[:JUDGE_ROWS], labels=y[:JUDGE_ROWS])
        for k, (title, passes) in enumerate(plans):
            out = Path(tmp) / f"fused{k}.onnx"
            held = 1 <= k <= len(OTHER_CHAINS) + 1  # selection rows: judged on the first rows
            commands.append(
                "onnxprune models/digits/torch_cnn.onnx "
                + " ".join(f"-p {shorten(p)}" for p in passes)
                + " --data models/digits/torch_cnn.calib.npz -o OUT.onnx"
                + (f" --eval-data TEST_ROWS_0_{JUDGE_ROWS - 1}.npz" if held else "")
            )
            error = run_cli(passes, out, judge if held else None)
            if error:
                rows.append(Row(title, None, None, None, f"failed: {error}"))
                continue
            model = onnxprune.load(out)
            if k == 1:
                done = json.loads(out.with_suffix(".json").read_text())["passes"]
                fuse = next(p for p in done if p["pass"] == "fuse")
                picked = [{"name": n, **v} for n, v in fuse["selection"]["members"].items()]
            rows_x, rows_y = (x[JUDGE_ROWS:], labels[JUDGE_ROWS:]) if held else (x, labels)
            acc = float(np.mean(probabilities(model, rows_x).argmax(1) == rows_y))
            macs, params = cost(model)
            note = (
                f"CLI; judged on test rows 0-{JUDGE_ROWS - 1}, evaluated on rows "
                f"{JUDGE_ROWS}-{len(labels) - 1}"
                if held
                else "CLI, evaluated on the test split"
            )
            rows.append(Row(title, acc, macs, params, note))
    return rows, commands, picked


def shorten(text: str) -> str:
    """Paths under the repository written relative to it."""
    return text.replace(str(ROOT) + "/", "")


def machine() -> str:
    """CPU, AVX-512 flavour, cores, Python and onnxruntime versions."""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        flags = ""
    avx = re.search(r"avx512[a-z]*", flags)
    import onnxruntime

    return (
        f"{platform.machine()}, {avx.group(0) if avx else 'no AVX-512'}, "
        f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__} CPU"
    )


def table(rows: list[Row]) -> str:
    """Markdown table of ``rows``."""
    head = "| model | test accuracy | MACs / sample | parameters | note |\n|---|---|---|---|---|"
    return "\n".join([head, *(r.markdown() for r in rows)])


def main(argv: list[str] | None = None) -> int:
    """Measure, print, and write the doc when asked."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--doc", type=Path, help="write the results as this markdown file")
    ap.add_argument(
        "--chain",
        nargs="+",
        default=DEFAULT_CHAIN,
        help="passes of the selection row ({members}: the other members' paths joined by +)",
    )
    args = ap.parse_args(argv)
    names = [n for n in MEMBERS if (DIGITS / f"{n}.onnx").exists()]
    rows, probs, labels = members_rows(names)
    best = max(rows, key=lambda r: r.accuracy or 0.0)
    held = [
        Row(r.name, float(np.mean(probs[r.name][JUDGE_ROWS:].argmax(1) == labels[JUDGE_ROWS:])),
            r.macs, r.params)
        for r in rows
    ]  # fmt: skip
    best_held = max(held, key=lambda r: (r.accuracy or 0.0, -(r.macs or 0)))
    seeds = [n for n in CNN_SEEDS if n in probs]
    ens = [
        ensemble_row(f"output ensemble, all {len(names)} members", names, probs, labels, rows),
        ensemble_row(
            "output ensemble, torch_cnn + keras_cnn + torch_encoder", CROSS, probs, labels, rows
        ),
        ensemble_row(f"output ensemble, {len(seeds)} torch_cnn seeds", seeds, probs, labels, rows),
    ]
    merges, stats = merge_rows(seeds, labels)
    budget = mac_budget(rows)
    fused, commands, picked = fused_rows(args.chain, labels, budget)
    text = report(rows, ens, merges, fused, stats, commands, (best, best_held), len(labels))
    text = text.replace(PICKED, members_table(picked, budget))
    text = text.replace(KEPT, kept_line(picked, fused[1]))
    print(text)
    if args.doc:
        args.doc.write_text(text)
    return 0


PICKED = "<!-- picked -->"
KEPT = "<!-- kept -->"


def kept_line(picked: list[dict], row: Row) -> str:
    """What the selection row's fuse kept, and what its vote then removed."""
    kept = [m for m in picked if m["weight"] > 0]
    if not kept or row.macs is None:
        return ""
    macs = sum(m.get("macs", 0) for m in kept)
    names = " + ".join(m["name"] for m in kept)
    return (
        f"* The second row's selection keeps {names} ({macs:,} MACs); its vote then removes "
        f"{macs - row.macs:,} MACs."
    )


def members_table(picked: list[dict], budget: int) -> str:
    """The selection row's members: MACs, accuracy alone and marginal contribution on the
    judging rows, weight kept (the fuse report's ``selection.members``)."""
    if not picked:
        return ""
    head = [
        f"Members in the selection row (MAC budget {budget:,}: the cheapest CNN member's MACs, "
        f"from costs alone), as its fuse report gives them: accuracy alone and marginal "
        f"contribution (the full ensemble's accuracy less that without the member) on the "
        f"judging rows 0-{JUDGE_ROWS - 1}, the weight kept.",
        "",
        "| member | MACs / sample | accuracy alone | marginal | weight |",
        "|---|---|---|---|---|",
    ]
    body = [
        f"| {m['name']} | {m.get('macs', 0):,} | {m['alone']:.4f} | {m['marginal']:+.4f} "
        f"| {m['weight']:.3f} |"
        for m in picked
    ]
    return "\n".join([*head, *body, ""])


def reading(
    rows: list[Row], ens: list[Row], merges: list[Row], fused: list[Row], bests: tuple[Row, Row]
) -> list[str]:
    """The issue's checks, each with its figures (computed, never written by hand); ``bests``:
    the best member on the whole test split and on the rows that did not judge."""
    best, best_held = bests
    out = [
        f"* Output ensemble of all members: {ens[0].accuracy:.4f} against the best member's "
        f"{best.accuracy:.4f}, at {(ens[0].macs or 0) / (best.macs or 1):.1f}x its MACs."
    ]
    worst = min(r.accuracy or 0.0 for r in rows if r.name.startswith("torch_cnn"))
    for k in range(0, len(merges), 6):
        a, b, c, d, e, f = merges[k : k + 6]
        out.append(
            f"* {a.name}: {a.accuracy:.4f} without alignment, {b.accuracy:.4f} with weight "
            f"matching, {e.accuracy:.4f} with activation matching; with REPAIR "
            f"{c.accuracy:.4f} / {d.accuracy:.4f} / {f.accuracy:.4f}. The weakest seed alone "
            f"has {worst:.4f}."
        )
    if fused[0].accuracy is not None:
        verdict = "holds" if fused[0].accuracy >= (best.accuracy or 0.0) else "does not hold"
        out.append(f"* Fused accuracy >= the best member's: {verdict} ({fused[0].accuracy:.4f}).")
    if fused[1].accuracy is not None:
        ok = fused[1].accuracy >= (best_held.accuracy or 0.0) and (fused[1].macs or 0) <= (
            best_held.macs or 0
        )
        out.append(
            f"* After selection + vote + fold, MACs <= the best member's at accuracy >= its, "
            f"on test rows {JUDGE_ROWS} and later (no step saw them): "
            f"{'holds' if ok else 'does not hold'} ({fused[1].accuracy:.4f} at "
            f"{fused[1].macs:,} MACs; the best member there, {best_held.name}: "
            f"{best_held.accuracy:.4f} at {best_held.macs:,} MACs)."
        )
    out.append(KEPT)
    for r in fused[2:-1]:
        if r.accuracy is not None:
            ok = r.accuracy >= (best_held.accuracy or 0.0) and (r.macs or 0) <= (
                best_held.macs or 0
            )
            out.append(
                f"* {r.name[0].upper()}{r.name[1:]}: {r.accuracy:.4f} at {r.macs:,} MACs on the "
                f"same rows ({'holds' if ok else 'does not hold'})."
            )
    return out


def report(
    rows: list[Row],
    ens: list[Row],
    merges: list[Row],
    fused: list[Row],
    stats: list[dict],
    commands: list[str],
    bests: tuple[Row, Row],
    n_test: int,
) -> str:
    """The whole markdown document."""
    best = bests[0]
    aligned = stats[-1]
    per_set = "\n".join(
        f"| {s['group']} | {s['channels']} | {', '.join(s['members'][:3])}{' ...' if len(s['members']) > 3 else ''} | "
        f"{' / '.join(f'{v:.3f}' for v in s['correlation_before'])} | "
        f"{' / '.join(f'{v:.3f}' for v in s['correlation_after'])} |"
        for s in aligned["sets"]
    )
    lines = [
        "# Model fusion on digits",
        "",
        "Command: `.venv/bin/python scripts/bench_fusion.py --doc docs/fusion.md`",
        "",
        f"Machine: {machine()}; the project's development machine (2 cores, 24 GiB). Accuracy on",
        f"the held-back test split ({n_test} images, the same for every member), MACs per sample from",
        "`onnxprune.cost`. Members were trained by `scripts/train_digits.py` (same split, same",
        "recipe per architecture: seeds 0-3 of the torch CNN, 0-1 of the Keras CNN, 0-2 of the",
        "torch encoder).",
        "",
        "## Members",
        "",
        table(rows),
        "",
        f"Best single member: {best.name} ({best.accuracy:.4f}, {best.macs:,} MACs).",
        "",
        "## Output ensembles (numpy, mean of probabilities)",
        "",
        table(ens),
        "",
        "## Weight-space fusion (`onnxprune.fusion.weights.merge_weights`)",
        "",
        "One model with one member's cost: the seeds' parameters averaged, with or without first",
        "permuting each seed's channels onto the first's (weight matching within each channel",
        "group of the analysis; or activation matching: the correlation of the channels'",
        "activations on the calibration split), then, on the rows marked REPAIR, each hidden",
        "Conv/Gemm's output",
        "channels rescaled on the calibration split so that their mean and standard deviation",
        "are the members' mean (`merge_weights(..., data=...)`; the torch export has its BN",
        "folded into the convolutions, so there are no BN statistics to reset).",
        "",
        table(merges),
        "",
        "Matched-channel correlation with torch_cnn per aligned set, one figure per other seed:",
        "",
        "| group | channels | members | before | after |",
        "|---|---|---|---|---|",
        per_set,
        "",
        "Averaging weights needs the seeds to sit in one basin once aligned; re-basin reports",
        "that for networks much wider than these (16-64 channels), and here the merge stays",
        "below every member: for small models the output ensemble (or one member) is the answer.",
        "",
        "## The fuse pass (filled when it is registered)",
        "",
        "The rows run the CLI on torch_cnn with every other member (the last: with the other",
        "torch_cnn seeds; `--data` the calibration split) and are evaluated here on the test",
        "split. The selection rows (second to fifth) are judged on test rows "
        f"0-{JUDGE_ROWS - 1} (`--eval-data`) and evaluated on the other rows only; the second",
        f"row's chain is `--chain` (default: {' '.join(f'`-p {c}`' for c in DEFAULT_CHAIN)};",
        "`{members}` is filled in, `{max_macs}` is the MAC budget: the cheapest CNN member's",
        "MACs, a cost chosen without looking at any accuracy, `{max_macs2}` twice it); the",
        "third prunes the same selection with a 1-point vote budget, the fourth is the chain",
        "before the MAC budget (accuracy selection on the judging rows), the fifth selects",
        "members within twice the budget and lets vote's MAC target",
        "(`vote:max_macs`, the least damage at that cost, across every member's groups) cut",
        "the ensemble to the budget.",
        "",
        table(fused),
        "",
        PICKED,
    ]
    if commands:
        lines += ["Commands:", "", *(f"    {c}" for c in commands), ""]
    lines += ["## Reading", "", *reading(rows, ens, merges, fused, bests), ""]
    lines += [
        "Alignment statistics (JSON):",
        "",
        "```json",
        json.dumps({k: v for k, v in aligned.items() if k != "sets"}, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
