"""Why a pruned model runs slower: one rule for "slower", and the causes known to cause it.

A pruned model is *slower* when the confidence interval of its median latency ratio (a
bootstrap over the interleaved rounds, :func:`~onnxprune.validation.latency.ratio_interval`)
lies wholly above ``1 + SLOW_MARGIN``: a real slowdown is flagged every time, a model as fast
as the original never. Without timings (statistics only) the rule falls back to the medians
and their median-to-p90 spread (:attr:`LatencyComparison.within_noise`).
Known causes: on the CPU provider, Convs whose channel counts lost their alignment to the NCHWc
block (:func:`unaligned_convs`); and runs so short that onnxruntime's per-node overhead dominates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import onnx

from onnxprune.runtime import CPU, channel_multiple
from onnxprune.validation.latency import CONFIDENCE, MARGIN, LatencyComparison

SHORT_RUN_MS = 0.2
SLOW_MARGIN = MARGIN  # flag "slower" past this share, and only beyond run-to-run noise


def _conv_channels(model: onnx.ModelProto) -> list[tuple[str, int, int]]:
    """(name, out channels, in channels) of each Conv whose weight is an initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = list(inits[node.input[1]].dims)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if len(dims) >= 2:
            found.append((node.name or f"#{i}", dims[0], dims[1] * group))
    return found


def unaligned_convs(original: onnx.ModelProto, model: onnx.ModelProto) -> list[str]:
    """Convs whose channel counts were multiples of the NCHWc block in ``original`` and are
    not any more."""
    block = channel_multiple()
    before = {name: (o, i) for name, o, i in _conv_channels(original)}
    out = []
    for name, o, i in _conv_channels(model):
        if name not in before:
            continue
        o0, i0 = before[name]
        lost = [
            f"{what} {a}->{b}"
            for what, a, b in (("out", o0, o), ("in", i0, i))
            if a % block == 0 and b % block
        ]
        if lost:
            out.append(f"{name} ({', '.join(lost)})")
    return out


def is_slower(cmp: LatencyComparison) -> bool:
    """The whole interval of the ratio above ``1 + SLOW_MARGIN`` (without one: the ratio, and
    beyond the median-to-p90 noise)."""
    if cmp.interval is not None:
        return cmp.interval[0] > 1 + SLOW_MARGIN
    return cmp.ratio > 1 + SLOW_MARGIN and not cmp.within_noise


def slow_causes(
    original: onnx.ModelProto, model: onnx.ModelProto, provider: str, cmp: LatencyComparison
) -> list[str]:
    """Likely reasons why the pruned model runs slower (known ones only)."""
    causes = []
    if provider == CPU:
        convs = unaligned_convs(original, model)
        if convs:
            shown = ", ".join(convs[:4]) + (f" and {len(convs) - 4} more" if len(convs) > 4 else "")
            causes.append(
                f"channel counts that are not multiples of {channel_multiple()} defeat "
                f"onnxruntime's blocked (NCHWc) convolution layout on this CPU: Conv {shown}; "
                f"prune to multiples of {channel_multiple()} (vote's round_to)"
            )
    if cmp.original.median_ms < SHORT_RUN_MS:
        causes.append(
            f"runs are very short ({cmp.original.median_ms:.3f} ms): onnxruntime's fixed "
            "per-node overhead dominates"
        )
    return causes


def interval_text(latency: Mapping[str, Any]) -> str:
    """``, 99% interval 2.41-2.63`` from a latency section (empty when it has none)."""
    ci = latency.get("interval")
    if not ci:
        return ""
    return f", {latency.get('confidence', CONFIDENCE):.0%} interval {ci[0]:.2f}-{ci[1]:.2f}"


def slow_message(latency: Mapping[str, Any]) -> str:
    """One line: how much slower the pruned model runs, and why when known."""
    o, p = latency["original"], latency["pruned"]
    msg = (
        f"the pruned model is SLOWER than the original: median {p['median_ms']:.3f} ms vs "
        f"{o['median_ms']:.3f} ms (ratio {latency['ratio']:.2f}{interval_text(latency)}) on "
        f"{latency['provider']}"
    )
    if latency["causes"]:
        msg += "; likely cause: " + "; ".join(latency["causes"])
    return msg
