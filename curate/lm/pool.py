"""Summed last-layer reply states of (prompt, reply) rows, batched: what response-set features read."""

from __future__ import annotations

from typing import Sequence

import torch

from curate.lm.forward import reply_states
from curate.lm.head import unwrap
from curate.scores.logps import span_sum


def pool_replies(model, encoder, prompts: Sequence, replies: Sequence[str], *, token_budget: int = 4096,
                 shared_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the fp32 sum of the last-layer states predicting the reply ``[N, d]``, and its token count ``[N]``.

    ``prompts[i]`` (chat messages) and ``replies[i]`` (text) are encoded by
    ``encoder`` (a :class:`curate.data.chat.ChatEncoder`) under its truncation
    rule (the reply kept whole, end-of-turn token included; the prompt cut from
    the left), so the mean state is ``sums / counts[:, None]``. Rows are run
    longest first in batches of about ``token_budget`` padded tokens. A reply
    longer than the encoder's ``max_length`` raises ``ReplyTooLong``.
    """
    encoded = [encoder.encode(p, r) for p, r in zip(prompts, replies)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt_ids) + len(encoded[i].reply_ids),
                   reverse=True)
    sums: torch.Tensor | None = None
    counts = torch.tensor([len(e.reply_ids) for e in encoded], dtype=torch.long)
    start = 0
    while start < len(order):
        longest = len(encoded[order[start]].prompt_ids) + len(encoded[order[start]].reply_ids)
        batch = order[start:start + max(1, token_budget // longest)]
        out = reply_states(model, [encoded[i].prompt_ids for i in batch], [encoded[i].reply_ids for i in batch],
                           list(range(len(batch))), shared_prompt=shared_prompt)
        pooled = span_sum(out.states, torch.zeros_like(out.lengths), out.lengths).cpu()
        if sums is None:
            sums = torch.zeros(len(encoded), pooled.shape[-1], dtype=torch.float32)
        sums[torch.tensor(batch)] = pooled
        start += len(batch)
    if sums is None:
        sums = torch.zeros(0, unwrap(model).config.hidden_size, dtype=torch.float32)
    return sums, counts
