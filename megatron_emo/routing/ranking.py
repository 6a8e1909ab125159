"""Tie-safe ranking: top-k and ranks where equal values go to the LOWER expert index.

``torch.topk`` and an unstable ``torch.sort`` order tied values arbitrarily (on CPU
``torch.topk(torch.zeros(1, 10), 3)`` gives ``[8, 6, 7]``), and a stable sort costs several
times a top-k. Instead every value becomes a distinct int64 key: the float's order-preserving
integer image in the high 32 bits and the reversed column index in the low 32 bits, so any
top-k or sort of the keys is deterministic and puts the lower index first among equals. The
fused Triton kernels (``fused_kernels.py``) build the same keys.

Shape legend: N rows, C columns (experts), K selected columns.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["descending_keys", "topk_lowest_index"]

_LOW_BITS = 32
_LOW_MASK = (1 << _LOW_BITS) - 1


def descending_keys(values_NC: torch.Tensor) -> torch.Tensor:
    """Distinct int64 keys that order like ``values_NC``, equal values by lower column first.

    ``key(a, i) > key(b, j)`` iff ``a > b``, or ``a == b`` and ``i < j`` (``-0.0 == 0.0``;
    ``-inf`` is the smallest value, so masked-out experts rank last).

    Args:
        values_NC: ``(N, C)`` floating values (compared in fp32; fp64 inputs are rounded to
            fp32 first, exactly as the routing math does).

    Returns:
        ``(N, C)`` int64 keys.
    """
    num_cols = values_NC.shape[-1]
    if num_cols > _LOW_MASK:
        raise ValueError(f"descending_keys supports up to {_LOW_MASK} columns, got {num_cols}")
    # "+ 0.0" turns -0.0 into +0.0 (they compare equal, so they must get equal keys); it also
    # gives a fresh tensor for the in-place step below.
    bits_NC = (values_NC.detach().float() + 0.0).view(torch.int32)
    # IEEE sign-magnitude -> two's complement order: flip the magnitude bits of negative floats.
    flip_NC = bits_NC >> 31
    flip_NC &= 0x7FFFFFFF
    rev_col_C = torch.arange(_LOW_MASK, _LOW_MASK - num_cols, -1, device=values_NC.device)
    if sys.byteorder != "little":
        bits_NC ^= flip_NC
        return (bits_NC.to(torch.int64) << _LOW_BITS) + rev_col_C
    # Write the two 32-bit halves of every int64 key in place (little endian: low word first):
    # one pass instead of widen, shift and add (~1.5x faster for the whole key on CPU).
    halves_NC2 = torch.empty((*values_NC.shape, 2), dtype=torch.int32, device=values_NC.device)
    torch.bitwise_xor(bits_NC, flip_NC, out=halves_NC2[..., 1])
    halves_NC2[..., 0] = rev_col_C.to(torch.int32)  # the same 32 bits, as int32
    return halves_NC2.view(torch.int64).squeeze(-1)


def topk_lowest_index(values_NC: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values of every row, ties going to the lower column.

    Args:
        values_NC: ``(N, C)`` floating values.
        k: columns to select, ``1 <= k <= C``.

    Returns:
        ``(N, k)`` int64 column indices in descending value order.
    """
    return torch.topk(descending_keys(values_NC), k, dim=-1).indices
