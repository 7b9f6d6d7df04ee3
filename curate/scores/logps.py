"""Per-sequence reductions over reply spans (pure tensor math, no I/O).

A reply of n tokens (end-of-turn token included) is scored from the n hidden
states that predict it: the last prompt token's state and the states of the
reply's first n-1 tokens. Masks come from start/length, never from token ids,
because many chat models pad with their end-of-turn token.
"""

from __future__ import annotations

import torch


def span_mask(seq_len: int, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N, seq_len]`` mask that is true on ``start[i] <= t < start[i] + length[i]``."""
    positions = torch.arange(seq_len, device=start.device).unsqueeze(0)
    start = start.unsqueeze(1)
    return (positions >= start) & (positions < start + length.unsqueeze(1))


def span_sum(values: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Sum ``values[i, start[i] : start[i] + length[i]]`` over the sequence axis, in fp32.

    ``values`` is ``[N, T]`` or ``[N, T, d]``; works for any padding side.
    """
    mask = span_mask(values.shape[1], start, length)
    if values.dim() == 3:
        mask = mask.unsqueeze(-1)
    return torch.where(mask, values.float(), 0.0).sum(dim=1)
