"""Training batches on the LM core: chosen and rejected replies of B pairs in one forward.

Two layouts of a batch, giving the same numbers (:func:`curate.lm.reply_states`):

- shared prompt (:func:`collate_shared`, the fast default for sequence-level
  losses): the B prompts run once; the 2B replies (chosen then rejected) run on
  copies of their KV cache. Gradients flow through the cache into the prompt pass.
- full sequences (:func:`collate`): 2B (prompt + reply) rows. Used when every
  layer's hidden state is needed (SparsePO masks) and with gradient
  checkpointing (no KV cache).

Either way logits are computed only at the positions that predict a reply
token, through the model's own head and logit post-processing in fp32
(:func:`curate.lm.head_logits`), the same as scoring and eval; rows are
left-aligned (column j predicts reply token j) and masks come from lengths.
Encoding and truncation are :func:`curate.lm.encode_pairs`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from curate.lm import EncodedPair, Encoding, encode_pairs, head_logits, pair_rows, reply_states, right_pad
from curate.lm import logits_logps as token_logps

__all__ = ["Batch", "EncodedPair", "Encoding", "PolicyForward", "collate", "collate_shared", "encode_pairs",
           "on_reply", "reply_forward", "sequence_logps", "token_logps"]


@dataclass
class Batch:
    """2B reply rows (chosen then rejected) of B encoded pairs, and how to run them."""

    pairs: Sequence[EncodedPair]
    labels: Tensor  # [2B, R] reply ids, left-aligned, right-padded
    valid: Tensor  # [2B, R] float, 1.0 on reply tokens
    shared_prompt: bool

    def to(self, device: torch.device) -> "Batch":
        return replace(self, labels=self.labels.to(device), valid=self.valid.to(device))


def _collate(pairs: Sequence[EncodedPair], pad_id: int, shared_prompt: bool) -> Batch:
    replies = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    lengths = torch.tensor([len(r) for r in replies])
    width = int(lengths.max())
    valid = (torch.arange(width)[None, :] < lengths[:, None]).float()
    return Batch(list(pairs), right_pad(replies, width, pad_id), valid, shared_prompt)


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> Batch:
    """Full sequences: each (prompt, reply) row runs on its own."""
    return _collate(pairs, pad_id, shared_prompt=False)


def collate_shared(pairs: Sequence[EncodedPair], pad_id: int) -> Batch:
    """One prompt pass shared by both replies of each pair."""
    return _collate(pairs, pad_id, shared_prompt=True)


def reply_forward(model, batch: Batch, *, hidden_states: bool = False) -> tuple[Tensor, list[Tensor] | None]:
    """fp32 logits ``[2B, R, V]`` at the positions predicting each reply token (aligned with
    ``batch.labels``), and optionally every layer's hidden state there (``L`` x ``[2B, R, d]``)."""
    if hidden_states and batch.shared_prompt:
        raise ValueError("hidden states need a full-sequence batch (collate)")
    prompts, replies, owner = pair_rows(batch.pairs)
    out = reply_states(model, prompts, replies, owner, shared_prompt=batch.shared_prompt, grad=True,
                       all_layers=hidden_states)
    return head_logits(model, out.states), out.layers


class PolicyForward(torch.nn.Module):
    """``reply_forward`` as one module call, so DDP sees a single forward per backward
    even when the shared-prompt layout runs the model several times."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tensor:
        return reply_forward(self.model, batch)[0]


def on_reply(values: Tensor, batch: Batch) -> Tensor:
    """``values`` on reply tokens, exact zeros elsewhere (where(), not a product: padding may hold inf/NaN)."""
    return torch.where(batch.valid > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


def sequence_logps(logits: Tensor, batch: Batch) -> Tensor:
    """Σ log p over each row's reply tokens, ``[2B]`` fp32."""
    return on_reply(token_logps(logits, batch.labels), batch).sum(-1)
