"""Tokenise pairs, pad chosen+rejected into one batch, and read per-token quantities off a forward.

Layout of a batch of B pairs: 2B rows, the B chosen sequences then the B
rejected ones, **left-padded** to a common length T, so every reply ends at
column T-1. A reply of n tokens (end-of-turn token included) is predicted by
the logits at columns T-1-n .. T-2. Only the last R+1 columns' logits are
computed (R = the longest reply in the batch; ``logits_to_keep``): the prompt
positions never reach the LM head, which saves a large share of the work.
Masks are built from lengths, never from ``ids != pad_id`` (SmolLM2 pads with
its end-of-turn token).

Truncation rule (from :class:`curate.data.chat.ChatEncoder`): a sequence over
``max_length`` keeps its reply whole and loses prompt tokens from the left;
a pair whose reply alone does not fit is left out and counted.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import polars as pl
import torch
from torch import Tensor


@dataclass
class EncodedPair:
    chosen: list[int]  # prompt + reply token ids
    rejected: list[int]
    chosen_reply_len: int
    rejected_reply_len: int


@dataclass
class Encoding:
    pairs: list[EncodedPair]
    kept: list[int]  # row index into the input table of each encoded pair
    truncated: int  # pairs whose prompt lost tokens to max_length
    too_long: list[str]  # pair_ids left out: a reply alone exceeds max_length


def encode_pairs(pairs: pl.DataFrame, encoder) -> Encoding:
    """Tokenise every pair with ``encoder`` (a ChatEncoder); the prompt is rendered once per pair."""
    from curate.data.chat import ReplyTooLong

    encoded, kept, too_long, truncated = [], [], [], 0
    rows = pairs.select("pair_id", "prompt", "chosen", "rejected").iter_rows()
    for i, (pair_id, prompt, chosen, rejected) in enumerate(rows):
        prompt_ids = encoder.prompt_ids(prompt)
        try:
            c = encoder.truncate(prompt_ids, encoder.reply_ids(chosen))
            r = encoder.truncate(prompt_ids, encoder.reply_ids(rejected))
        except ReplyTooLong:
            too_long.append(pair_id)
            continue
        truncated += bool(c.prompt_truncated or r.prompt_truncated)
        encoded.append(EncodedPair(c.prompt_ids + c.reply_ids, r.prompt_ids + r.reply_ids,
                                   len(c.reply_ids), len(r.reply_ids)))
        kept.append(i)
    return Encoding(encoded, kept, truncated, too_long)


@dataclass
class Batch:
    input_ids: Tensor  # [2B, T], chosen rows then rejected rows, left-padded
    attention_mask: Tensor  # [2B, T]
    position_ids: Tensor  # [2B, T], counting from the first real token
    labels: Tensor  # [2B, R], the last R tokens of each row
    valid: Tensor  # [2B, R] float, 1.0 on reply tokens

    @property
    def reply_window(self) -> int:
        return self.labels.shape[1]

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                              self.labels, self.valid)))


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> Batch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    reply_lens = torch.tensor([p.chosen_reply_len for p in pairs] + [p.rejected_reply_len for p in pairs])
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, T - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, T - len(seq):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    R = int(reply_lens.max())
    valid = (torch.arange(R)[None, :] >= (R - reply_lens)[:, None]).float()
    return Batch(input_ids, attention_mask, position_ids, input_ids[:, T - R:], valid)


def _accepts_logits_to_keep(model) -> bool:
    model = getattr(model, "module", model)  # DDP wrapper
    base = getattr(model, "get_base_model", None)
    target = base() if callable(base) else model
    return "logits_to_keep" in inspect.signature(target.forward).parameters


def reply_forward(model, batch: Batch, *, hidden_states: bool = False) -> tuple[Tensor, list[Tensor] | None]:
    """Logits ``[2B, R, V]`` at the positions predicting each reply token, and optionally the
    hidden state of every layer at those positions (``L`` tensors ``[2B, R, d]``).
    """
    R = batch.reply_window
    kwargs: dict[str, Any] = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, use_cache=False)
    if hidden_states:
        kwargs["output_hidden_states"] = True
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = R + 1
    out = model(**kwargs)
    logits = out.logits[:, -(R + 1):-1]
    hidden = None
    if hidden_states:
        # hidden_states[0] is the embedding output; layers are 1..L
        hidden = [h[:, -(R + 1):-1] for h in out.hidden_states[1:]]
    return logits, hidden


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) per position in fp32, ``[N, R, V], [N, R] -> [N, R]``."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def on_reply(values: Tensor, batch: Batch) -> Tensor:
    """``values`` on reply tokens, exact zeros elsewhere (where(), not a product: padding may hold inf/NaN)."""
    return torch.where(batch.valid > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


def sequence_logps(logits: Tensor, batch: Batch) -> Tensor:
    """Σ log p over each row's reply tokens, ``[2B]`` fp32."""
    return on_reply(token_logps(logits, batch.labels), batch).sum(-1)
