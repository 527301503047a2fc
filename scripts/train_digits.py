"""Train small classifiers on scikit-learn's digits data and export them to models/digits/.

    bash scripts/fixtures/env.sh torch && .venvs/torch/bin/python scripts/train_digits.py torch
    bash scripts/fixtures/env.sh tf    && .venvs/tf/bin/python    scripts/train_digits.py keras

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
    if len(argv) != 1 or argv[0] not in ("torch", "keras"):
        print("usage: train_digits.py torch|keras", file=sys.stderr)
        return 2
    if argv[0] == "torch":
        import digits_torch as trainer
    else:
        import digits_keras as trainer
    trainer.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
