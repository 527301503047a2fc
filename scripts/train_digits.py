"""Train small classifiers on scikit-learn's digits data and export them to models/digits/.

    bash scripts/fixtures/env.sh torch && .venvs/torch/bin/python scripts/train_digits.py torch
    bash scripts/fixtures/env.sh tf    && .venvs/tf/bin/python    scripts/train_digits.py keras
    .venvs/torch/bin/python scripts/train_digits.py torch torch_cnn_seed1 torch_cnn_seed2

Names after the framework train only those models (seeds: ``torch_cnn_seed1..3``,
``torch_encoder_seed1..2``, ``keras_cnn_seed1``); without names, every model of the framework.

Each model is saved with a sample (framework output), a calibration split
(``<model>.calib.npz``) and the held-back test split (``<model>.test.npz``): arrays keyed by the
model's input name, plus ``labels``. The split is ``digits_data.split()``, identical for all.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))


def main(argv: list[str]) -> int:
    """Dispatch to the framework's trainer (each runs in its own virtual environment)."""
    if not argv or argv[0] not in ("torch", "keras"):
        print("usage: train_digits.py torch|keras [NAME ...]", file=sys.stderr)
        return 2
    if argv[0] == "torch":
        import digits_torch as trainer
    else:
        import digits_keras as trainer
    trainer.main(argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
