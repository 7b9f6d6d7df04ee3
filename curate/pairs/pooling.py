"""Pool each reply's last-layer states once: the one forward per response pool-CHES needs.

For a (prompt, reply) whose reply ids end with the end-of-turn token, the
sequence ``prompt + reply[:-1]`` runs once through the decoder (left-padded,
so the ``n`` states predicting an ``n``-token reply are the last ``n``
columns), and the fp32 sum of those states is kept (methods.md section 1,
the same positions as :mod:`curate.scores.engine`). Every CHES / LN-CHES of
two replies of one prompt is then a dot product of these sums
(:func:`curate.scores.ches.ches_matrix`).

Batches are sorted by length and fill the engine's token and attention
budgets; an out-of-memory error splits the batch in two and retries.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from curate.scores.engine import (_decoder_and_head, _is_oom, default_attention_budget, default_token_budget,
                                  left_pad)


def _batches(lengths: Sequence[int], token_budget: int, attention_budget: int | None) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for index in order:
        if batches:
            rows, width = len(batches[-1]) + 1, lengths[batches[-1][0]]  # longest first: the first sets the width
            if rows * width <= token_budget and (attention_budget is None or rows * width * width <= attention_budget):
                batches[-1].append(index)
                continue
        batches.append([index])
    return batches


def _forward(model, seqs: Sequence[Sequence[int]], reply_lengths: Sequence[int]) -> torch.Tensor:
    decoder, _ = _decoder_and_head(model)
    device = next(model.parameters()).device
    ids, mask, positions = left_pad(seqs, device)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    keep = torch.arange(hidden.shape[1], device=device).unsqueeze(0) >= (
        hidden.shape[1] - torch.tensor(reply_lengths, device=device)).unsqueeze(1)
    return torch.where(keep.unsqueeze(-1), hidden.float(), 0.0).sum(1).cpu()


def pool_replies(model, encoded: Sequence[tuple[Sequence[int], Sequence[int]]], *, token_budget: int | None = None,
                 on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """fp32 ``[N, d]`` sums of the last-layer states predicting each reply, in input order.

    ``encoded``: ``(prompt ids, reply ids)`` per response, each reply ending
    with its end-of-turn token. One decoder sequence per response.
    """
    if any(len(p) == 0 or len(r) == 0 for p, r in encoded):
        raise ValueError("every response needs a non-empty prompt and a reply that ends with the end-of-turn token")
    seqs = [list(p) + list(r[:-1]) for p, r in encoded]
    replies = [len(r) for _, r in encoded]
    budget = token_budget or default_token_budget(model)
    pending = _batches([len(s) for s in seqs], budget, default_attention_budget(model))
    out: torch.Tensor | None = None
    with torch.inference_mode():
        while pending:
            batch = pending.pop(0)
            try:
                sums = _forward(model, [seqs[i] for i in batch], [replies[i] for i in batch])
            except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not _is_oom(exc) or len(batch) == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                pending[:0] = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
                continue
            if out is None:
                out = torch.empty(len(seqs), sums.shape[1], dtype=torch.float32)
            out[torch.tensor(batch)] = sums
            if on_batch is not None:
                on_batch(len(batch))
    return out if out is not None else torch.empty(0, 0)
