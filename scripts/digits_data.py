"""scikit-learn's digits data, split once, the same way for every framework.

``split()`` returns (train, calib, test) as (images float32 [N, 8, 8] in [0, 1], labels int64).
The test split is held back; calibration is a slice of the training data that pruning may use.
Used by ``scripts/train_digits.py``; needs numpy and scikit-learn only.
"""

from __future__ import annotations

import numpy as np

SEED = 0
TEST_SHARE = 0.2
CALIB_SIZE = 256


def split() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Deterministic train / calibration / test split of the 1,797 digits images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    n_test = int(round(TEST_SHARE * len(labels)))
    test, train = order[:n_test], order[n_test:]
    calib = train[:CALIB_SIZE]
    return (
        (images[train], labels[train]),
        (images[calib], labels[calib]),
        (images[test], labels[test]),
    )
