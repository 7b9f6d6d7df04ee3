"""CHES and its baselines from pooled hidden states (pure math, no I/O).

Razin et al. 2025 (Def. 2, 3): with S± the sum of the last-layer hidden
states at the positions that predict the reply tokens of y± (EOS included),

    CHES    = <S+, S->  - ||S+||^2
    LN-CHES = <m+, m->  - ||m+||^2,   m± = S± / |y±|

Only the chosen side's norm is subtracted. One pooled vector per (prompt,
reply) is enough: every pairing is a dot product, so k replies to one prompt
give all k^2 scores from k forwards (``ches_matrix``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def ches(sum_chosen: torch.Tensor, sum_rejected: torch.Tensor) -> torch.Tensor:
    """CHES per row from summed hidden states ``[..., d]`` (computed in fp64 for stability)."""
    pos = sum_chosen.double()
    neg = sum_rejected.double()
    return (pos * neg).sum(-1) - (pos * pos).sum(-1)


def ln_ches(sum_chosen: torch.Tensor, sum_rejected: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor,
            ) -> torch.Tensor:
    """Length-normalised CHES: CHES of the mean states m± = S± / |y±|."""
    mean_pos = sum_chosen.double() / n_chosen.double().unsqueeze(-1)
    mean_neg = sum_rejected.double() / n_rejected.double().unsqueeze(-1)
    return ches(mean_pos, mean_neg)


def ches_matrix(pooled: torch.Tensor) -> torch.Tensor:
    """All pairings of k pooled vectors ``[k, d]`` of one prompt.

    Entry ``[i, j]`` is CHES with reply i as chosen and reply j as rejected:
    ``<p_i, p_j> - ||p_i||^2``. Pass sums for CHES, means for LN-CHES.
    """
    gram = pooled.double() @ pooled.double().T
    return gram - gram.diagonal().unsqueeze(1)


def hidden_inner(last_chosen: torch.Tensor, last_rejected: torch.Tensor) -> torch.Tensor:
    """The paper's last-hidden-state baseline: <h+, h-> of the states that predict EOS."""
    return (last_chosen.double() * last_rejected.double()).sum(-1)


def normalized_edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Levenshtein distance of two token sequences divided by the longer length.

    The paper's baseline, over reply tokens without the end-of-turn token.
    Two empty sequences have distance 0.
    """
    longest = max(len(a), len(b))
    if longest == 0:
        return 0.0
    row_tokens = np.asarray(list(a))
    col_tokens = np.asarray(list(b))
    offsets = np.arange(len(col_tokens) + 1)
    previous = offsets.copy()
    for i, token in enumerate(row_tokens, start=1):
        # substitution/match and deletion come from the previous row (vectorised) ...
        current = np.empty_like(previous)
        current[0] = i
        current[1:] = np.minimum(previous[:-1] + (col_tokens != token), previous[1:] + 1)
        # ... insertions chain along the row: current[j] = min_k current[k] + (j - k)
        current = np.minimum.accumulate(current - offsets) + offsets
        previous = current
    return float(previous[-1]) / longest
