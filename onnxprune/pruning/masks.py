"""Padding masks: which token positions are real, so statistics skip the padded ones.

A model whose inputs include an attention mask (``attention_mask``, ``input_mask``...: an
integer or bool input of rank 2, ``[batch, sequence]``, named with ``mask``) marks padded
tokens with 0. Activations whose axes other than the channel axis are exactly that
``[batch, sequence]`` (``[B, S, D]`` hidden states) are then measured on the real tokens only;
other tensors (pooled ``[B, D]``, heads ``[B, H, S, d]``, images) are measured whole.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.data import input_specs
from onnxprune.errors import PassOptionError

AUTO = "auto"  # detect the mask input by name and type
OFF = "none"  # never mask


def is_mask_spec(dims: list, dtype: np.dtype) -> bool:
    """A declared input that can be a padding mask: rank 2, integer or bool."""
    return len(dims) == 2 and (np.issubdtype(dtype, np.integer) or dtype == np.bool_)


def mask_input(model: onnx.ModelProto, choice: str = AUTO, where: str = "") -> str | None:
    """The input that masks padding, or None.

    ``choice``: ``auto`` takes the one rank-2 integer/bool input whose name contains ``mask``
    (``attention_mask`` when there are several; none when the choice is still ambiguous),
    ``none`` turns masking off, any other value names the input.

    Raises:
        PassOptionError: a named input that does not exist or cannot be a mask (``where``
            names the pass).
    """
    specs = input_specs(model)
    if choice == OFF:
        return None
    if choice != AUTO:
        prefix = f"{where}: " if where else ""
        if choice not in specs:
            raise PassOptionError(
                f"{prefix}mask_input={choice!r} is not a model input; inputs: {', '.join(specs)}"
            )
        dims, dtype = specs[choice]
        if not is_mask_spec(dims, dtype):
            raise PassOptionError(
                f"{prefix}mask_input={choice!r} is {dtype} of rank {len(dims)}: a padding mask "
                "is an integer or bool input [batch, sequence]"
            )
        return choice
    found = [n for n, (d, t) in specs.items() if "mask" in n.lower() and is_mask_spec(d, t)]
    if len(found) > 1:
        found = [n for n in found if n.lower() == "attention_mask"]
    return found[0] if len(found) == 1 else None


def positions(mask: np.ndarray | None, x: np.ndarray, axis: int) -> np.ndarray | None:
    """Which positions of ``x`` (row-major over its axes other than ``axis``) are real tokens:
    ``mask != 0`` flattened, when those axes are exactly the mask's shape; else None (all)."""
    if mask is None:
        return None
    x = np.asarray(x)
    rest = [d for i, d in enumerate(x.shape) if i != axis % max(x.ndim, 1)]
    if tuple(rest) != tuple(np.shape(mask)):
        return None
    return np.asarray(mask).reshape(-1) != 0
