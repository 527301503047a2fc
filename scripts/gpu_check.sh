#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the card, versions, the CUDA tests, validate's latency
# figures on CUDA beside the CPU on the same host, and the fold benchmarks.
#
#   bash scripts/gpu_check.sh [PYTHON]      # default: .venv/bin/python, else python3
#   RUNS=200 bash scripts/gpu_check.sh      # timed runs per model (default 100)
#
# PYTHON's environment needs onnxruntime-gpu (not onnxruntime: see README, Install) with its
# CUDA/cuDNN libraries, onnxprune installed (pip install -e ".[gpu]") and pytest + hypothesis.
# Copy the figures it prints into docs/benchmarks.md (section "validate on CUDA") with the date.
# Exit status: 0 all done; 1 a step failed; 2 no GPU that onnxruntime can use.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${1:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
runs=${RUNS:-100}

echo "== card"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
else
  echo "nvidia-smi: not found"
fi

echo "== versions"
"$py" - <<'PY'
import platform

import numpy
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune.runtime import cuda_works

print(f"python {platform.python_version()}, onnxprune {onnxprune.__version__}, onnx {onnx.__version__}, "
      f"onnxruntime {ort.__version__} ({ort.get_device()}), numpy {numpy.__version__}")
print("providers available:", ", ".join(ort.get_available_providers()))
print("cuda_works:", cuda_works())
PY

if ! "$py" -c 'import sys; from onnxprune.runtime import cuda_works; sys.exit(0 if cuda_works() else 1)'; then
  echo "no GPU that onnxruntime can use here: install onnxruntime-gpu (and only it) with matching CUDA/cuDNN" >&2
  exit 2
fi

echo "== CUDA tests"
"$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py

echo "== validate: folded vs zeroed, median latency ratio on CUDA and on CPU (same host, $runs runs)"
RUNS=$runs "$py" - <<'PY'
import os
import sys
from pathlib import Path

sys.path.insert(0, "scripts")
from bench_fold import mlp, zero_half  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.passes.validate import Validate  # noqa: E402

runs = int(os.environ["RUNS"])
cases = [("MLP 512-2048-2048-512 Gemm, batch 32", mlp([512, 2048, 2048, 512], "gemm"), 32),
         ("MLP 512-2048-2048-512 Gemm, batch 1", mlp([512, 2048, 2048, 512], "gemm"), 1)]
for rel in ("torch/cnn_legacy_bn", "digits/torch_cnn"):
    path = Path("models") / f"{rel}.onnx"
    if path.exists():
        cases.append((f"{rel}, batch 1", onnxprune.run(onnxprune.load(path), ["cleanup"])[0], 1))
print(f"{'model':40} {'device':6} {'zeroed ms':>10} {'folded ms':>10} {'p90 ratio':>9} "
      f"{'ratio':>7} {'MAC ratio':>9} {'cosine':>9}")
for name, model, batch in cases:
    zeroed = zero_half(model)
    for device in ("cuda", "cpu"):
        check = Validate(runs=runs, warmup=10, latency_batch=batch, samples=64)
        _, report = onnxprune.run(zeroed, ["fold", check], device=device)
        v = report["passes"][-1]
        lat = v["latency"]
        o, p = lat["original"], lat["pruned"]
        cos = min(out["cosine"] for out in v["outputs"])
        print(f"{name:40} {device:6} {o['median_ms']:>10.4f} {p['median_ms']:>10.4f} "
              f"{p['p90_ms'] / o['p90_ms']:>9.3f} {lat['ratio']:>7.3f} "
              f"{v['cost']['ratio']['macs']:>9.3f} {cos:>9.6f}  [{lat['provider']}]")
PY

echo "== fold benchmarks (scripts/bench_fold.py: CPU provider, one thread)"
"$py" scripts/bench_fold.py --runs "$runs"
echo "== done"
