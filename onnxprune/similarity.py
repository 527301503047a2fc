"""Output similarity shared by validation and pruning (numpy only, no layer above it)."""

from __future__ import annotations

import numpy as np


def cosine_similarity(ref: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Cosine per sample (rows of 2-D arrays); 1 for two zero rows, 0 for one zero row."""
    ref = ref.astype(np.float64).reshape(len(ref), -1)
    new = new.astype(np.float64).reshape(len(new), -1)
    dot = np.sum(ref * new, axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(new, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.clip(np.where(both_zero, 1.0, cos), -1.0, 1.0)
