"""Tokenise pairs, batch chosen+rejected together, and read per-token quantities off a forward.

Two layouts of a batch of B pairs, giving the same numbers:

- :class:`SharedPromptBatch` (the fast default for sequence-level losses):
  the B prompts run once, left-padded; their KV cache is copied for the 2B
  replies (chosen then rejected), which run right-padded in one forward.
  Gradients flow through the cache into the prompt pass. The prompt is
  usually most of a pair's tokens, so this saves a large share of the work.
- :class:`Batch`: 2B full sequences (prompt + reply), left-padded, so every
  reply ends at the last column. Used when every layer's hidden state is
  needed (SparsePO masks) and with gradient checkpointing (no KV cache).

Either way only positions that predict a reply token reach the LM head
(``logits_to_keep``), and masks are built from lengths, never from
``ids != pad_id`` (SmolLM2 pads with its end-of-turn token).

Truncation rule: a pair over ``max_length`` keeps both replies whole and
loses prompt tokens from the left until the longer reply fits (both replies
keep the same prompt); a pair whose reply alone does not fit is left out and
counted.
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
    prompt: list[int]  # shared by both replies
    chosen: list[int]  # reply ids, end-of-turn token included
    rejected: list[int]

    @property
    def longest(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class Encoding:
    pairs: list[EncodedPair]
    kept: list[int]  # row index into the input table of each encoded pair
    truncated: int  # pairs whose prompt lost tokens to max_length
    too_long: list[str]  # pair_ids left out: a reply alone exceeds max_length


def encode_pairs(pairs: pl.DataFrame, encoder) -> Encoding:
    """Tokenise every pair with ``encoder`` (a ChatEncoder).

    Both replies keep one prompt: it is cut from the left until the longer
    reply fits in ``max_length``, so chosen and rejected always share it.
    """
    from curate.data.chat import ReplyTooLong

    encoded, kept, too_long, truncated = [], [], [], 0
    rows = pairs.select("pair_id", "prompt", "chosen", "rejected").iter_rows()
    for i, (pair_id, prompt, chosen, rejected) in enumerate(rows):
        prompt_ids = encoder.prompt_ids(prompt)
        chosen_ids, rejected_ids = encoder.reply_ids(chosen), encoder.reply_ids(rejected)
        try:
            cut = encoder.truncate(prompt_ids, max(chosen_ids, rejected_ids, key=len))
        except ReplyTooLong:
            too_long.append(pair_id)
            continue
        truncated += bool(cut.prompt_truncated)
        encoded.append(EncodedPair(cut.prompt_ids, chosen_ids, rejected_ids))
        kept.append(i)
    return Encoding(encoded, kept, truncated, too_long)


def _valid_window(reply_lens: Tensor, R: int, *, right_aligned: bool) -> Tensor:
    cols = torch.arange(R)[None, :]
    if right_aligned:
        return (cols >= (R - reply_lens)[:, None]).float()
    return (cols < reply_lens[:, None]).float()


@dataclass
class Batch:
    """Full sequences: 2B rows (chosen then rejected), each prompt + reply, left-padded."""

    input_ids: Tensor  # [2B, T]
    attention_mask: Tensor  # [2B, T]
    position_ids: Tensor  # [2B, T], counting from the first real token
    labels: Tensor  # [2B, R], the last R tokens of each row
    valid: Tensor  # [2B, R] float, 1.0 on reply tokens

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                              self.labels, self.valid)))


@dataclass
class SharedPromptBatch:
    """B left-padded prompts, run once; 2B right-padded replies (chosen then rejected) read their cache."""

    prompt_ids: Tensor  # [B, P]
    prompt_mask: Tensor  # [B, P]
    prompt_positions: Tensor  # [B, P]
    labels: Tensor  # [2B, R] reply ids, right-padded
    valid: Tensor  # [2B, R] float
    reply_positions: Tensor  # [2B, R]

    def to(self, device: torch.device) -> "SharedPromptBatch":
        return SharedPromptBatch(*(t.to(device) for t in (self.prompt_ids, self.prompt_mask, self.prompt_positions,
                                                          self.labels, self.valid, self.reply_positions)))


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, T - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, T - len(seq):] = 1
    return ids, mask


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> Batch:
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    reply_lens = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs])
    input_ids, attention_mask = _left_pad(seqs, pad_id)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    R = int(reply_lens.max())
    T = input_ids.shape[1]
    return Batch(input_ids, attention_mask, position_ids, input_ids[:, T - R:],
                 _valid_window(reply_lens, R, right_aligned=True))


def collate_shared(pairs: Sequence[EncodedPair], pad_id: int) -> SharedPromptBatch:
    prompt_ids, prompt_mask = _left_pad([p.prompt for p in pairs], pad_id)
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    replies = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    reply_lens = torch.tensor([len(r) for r in replies])
    R = int(reply_lens.max())
    labels = torch.full((len(replies), R), pad_id, dtype=torch.long)
    for row, reply in enumerate(replies):
        labels[row, :len(reply)] = torch.tensor(reply, dtype=torch.long)
    prompt_lens = prompt_mask.sum(-1).repeat(2)
    reply_positions = prompt_lens[:, None] + torch.arange(R)[None, :]
    return SharedPromptBatch(prompt_ids, prompt_mask, prompt_positions, labels,
                             _valid_window(reply_lens, R, right_aligned=False), reply_positions)


def _accepts_logits_to_keep(model) -> bool:
    model = getattr(model, "module", model)  # DDP wrapper
    base = getattr(model, "get_base_model", None)
    target = base() if callable(base) else model
    return "logits_to_keep" in inspect.signature(target.forward).parameters


def reply_forward(model, batch: Batch | SharedPromptBatch, *,
                  hidden_states: bool = False) -> tuple[Tensor, list[Tensor] | None]:
    """Logits ``[2B, R, V]`` at the positions predicting each reply token (aligned with
    ``batch.labels``), and optionally every layer's hidden state there (``L`` x ``[2B, R, d]``).
    """
    if isinstance(batch, SharedPromptBatch):
        if hidden_states:
            raise ValueError("hidden states need a full-sequence Batch")
        return _shared_prompt_forward(model, batch), None
    R = batch.labels.shape[1]
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


class PolicyForward(torch.nn.Module):
    """``reply_forward`` as one module call, so DDP sees a single forward per backward
    even when the shared-prompt layout runs the model twice."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch | SharedPromptBatch) -> Tensor:
        return reply_forward(self.model, batch)[0]


def _shared_prompt_forward(model, batch: SharedPromptBatch) -> Tensor:
    """Run each prompt once, then both replies on a copy of its KV cache (gradients flow through it).

    The last prompt position predicts the first reply token; reply position j predicts token j+1.
    """
    B = batch.prompt_ids.shape[0]
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    prompt_out = model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                       position_ids=batch.prompt_positions, use_cache=True, **keep)
    cache = prompt_out.past_key_values
    both = torch.arange(B, device=batch.prompt_ids.device).repeat(2)
    cache.reorder_cache(both)  # rows: prompts for the chosen replies, then for the rejected ones
    reply_mask = torch.cat([batch.prompt_mask[both], (batch.valid > 0).long()], dim=1)
    reply_out = model(input_ids=batch.labels, attention_mask=reply_mask, position_ids=batch.reply_positions,
                      past_key_values=cache, use_cache=True)
    first = prompt_out.logits[:, -1:][both]
    return torch.cat([first, reply_out.logits[:, :-1]], dim=1)


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) per position in fp32, ``[N, R, V], [N, R] -> [N, R]``."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def on_reply(values: Tensor, batch: Batch | SharedPromptBatch) -> Tensor:
    """``values`` on reply tokens, exact zeros elsewhere (where(), not a product: padding may hold inf/NaN)."""
    return torch.where(batch.valid > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


def sequence_logps(logits: Tensor, batch: Batch | SharedPromptBatch) -> Tensor:
    """Σ log p over each row's reply tokens, ``[2B]`` fp32."""
    return on_reply(token_logps(logits, batch.labels), batch).sum(-1)
