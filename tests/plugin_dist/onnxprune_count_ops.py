"""``count-ops``: an example third-party onnxprune pass (report only; the model is unchanged)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import ClassVar

import onnx

from onnxprune import Context, Pass, PassResult, option


@dataclass
class CountOps(Pass):
    """Report how many nodes of each op type the model has (subgraphs included)."""

    name: ClassVar[str] = "count-ops"
    top: int = option(0, "report only the N most frequent op types (0: all)")
    subgraphs: bool = option(True, "count nodes inside If/Loop/Scan bodies too")

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        counts: collections.Counter[str] = collections.Counter()
        graphs = [model.graph]
        while graphs:
            graph = graphs.pop()
            for node in graph.node:
                counts[node.op_type] += 1
                if self.subgraphs:
                    for attr in node.attribute:
                        graphs.extend([attr.g] if attr.HasField("g") else [])
                        graphs.extend(attr.graphs)
        common = counts.most_common(self.top or None)
        return PassResult(
            model,
            modified=False,
            report={
                "nodes": sum(counts.values()),
                "op_types": len(counts),
                "op_histogram": dict(common),
            },
        )
