"""Pool each reply's last-layer states once: the one forward per response pool-CHES needs.

For a (prompt, reply) whose reply ids end with the end-of-turn token, the
states at the positions predicting the reply (the last prompt token, then the
reply's tokens but the last) are summed in fp32 (methods.md section 1, the
same positions as :mod:`curate.scores.engine`). Every CHES / LN-CHES of two
replies of one prompt is then a dot product of these sums
(:func:`curate.scores.ches.ches_matrix`). Each reply's tokens run through the
decoder exactly once, through the LM core's :func:`curate.lm.reply_states`:

- ``prefix_sharing=True`` (default on CPU, as in the engine): responses with
  identical prompt ids share one prompt forward (left-padded, KV cache kept);
  the replies then run on copies of their prompt's cache rows, in groups of
  similar length, right-padded after the reply. A set of k responses costs one
  prompt pass and k reply passes.
- ``prefix_sharing=False`` (default on GPU): one left-padded
  ``prompt + reply[:-1]`` sequence per response; the ``n`` states predicting
  an ``n``-token reply are its last ``n`` columns.

Batches are sorted by length and fill the engine's token and attention
budgets; an out-of-memory error splits the batch in two and retries. (The
LM core's own ``curate.lm.pool_replies`` pools rows one prompt each; a set
of k replies needs them grouped under one prompt, which this module does.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from curate.lm import reply_states
from curate.scores.engine import (default_attention_budget, default_token_budget, greedy_batches, recover_from_oom,
                                  resolve_prefix_sharing)
from curate.scores.logps import span_sum


def _sums(model, prompts, replies, owner, shared: bool) -> torch.Tensor:
    out = reply_states(model, prompts, replies, owner, shared_prompt=shared)
    return span_sum(out.states, torch.zeros_like(out.lengths), out.lengths).cpu()


def pool_response_sets(model, encoded: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                       token_budget: int | None = None, prefix_sharing: bool | None = None,
                       on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """fp32 ``[N, d]`` sums of the last-layer states predicting each reply, in input order.

    ``encoded``: ``(prompt ids, reply ids)`` per response, each reply ending
    with its end-of-turn token. ``prefix_sharing``: see the module docstring
    (None: on CPU yes, on accelerators no).
    """
    if any(len(p) == 0 or len(r) == 0 for p, r in encoded):
        raise ValueError("every response needs a non-empty prompt and a reply that ends with the end-of-turn token")
    budget = token_budget or default_token_budget(model)
    attention_budget = default_attention_budget(model)
    if resolve_prefix_sharing(model, prefix_sharing):
        prompt_index: dict[tuple[int, ...], int] = {}
        for p, _ in encoded:
            prompt_index.setdefault(tuple(p), len(prompt_index))
        prompts = list(prompt_index)
        members: list[list[int]] = [[] for _ in prompts]
        for i, (p, _) in enumerate(encoded):
            members[prompt_index[tuple(p)]].append(i)
        order = sorted(range(len(prompts)), key=lambda g: len(prompts[g]), reverse=True)

        def cost(groups: list[int]) -> tuple[int, int]:
            width = len(prompts[groups[0]])
            rows = [i for g in groups for i in members[g]]
            longest = width + max(len(encoded[i][1]) for i in rows)
            return len(groups) * width + sum(len(encoded[i][1]) for i in rows), len(rows) * longest * longest

        def run(groups: list[int]) -> tuple[list[int], torch.Tensor]:
            rows = [i for g in groups for i in members[g]]
            local = {g: n for n, g in enumerate(groups)}
            prompt_of = [local[prompt_index[tuple(encoded[i][0])]] for i in rows]
            return rows, _sums(model, [prompts[g] for g in groups], [encoded[i][1] for i in rows], prompt_of, True)
    else:
        lengths = [len(p) + len(r) - 1 for p, r in encoded]
        order = sorted(range(len(encoded)), key=lambda i: lengths[i], reverse=True)

        def cost(items: list[int]) -> tuple[int, int]:
            width = lengths[items[0]]
            return len(items) * width, len(items) * width * width

        def run(items: list[int]) -> tuple[list[int], torch.Tensor]:
            return items, _sums(model, [encoded[i][0] for i in items], [encoded[i][1] for i in items],
                                list(range(len(items))), False)

    pending = greedy_batches(order, cost, budget, attention_budget)
    out: torch.Tensor | None = None
    while pending:
        batch = pending.pop(0)
        try:
            rows, sums = run(batch)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            recover_from_oom(exc, len(batch))
            pending[:0] = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
            continue
        if out is None:
            out = torch.empty(len(encoded), sums.shape[1], dtype=torch.float32)
        out[torch.tensor(rows)] = sums
        if on_batch is not None:
            on_batch(len(rows))
    return out if out is not None else torch.empty(0, 0)
