"""Pool each reply's last-layer states once: the one forward per response pool-CHES needs.

For a (prompt, reply) whose reply ids end with the end-of-turn token, the
states at the positions predicting the reply (the last prompt token, then the
reply's tokens but the last) are summed in fp32 (methods.md section 1, the
same positions as :mod:`curate.scores.engine`). Every CHES / LN-CHES of two
replies of one prompt is then a dot product of these sums
(:func:`curate.scores.ches.ches_matrix`). Each reply's tokens run through the
decoder exactly once:

- ``prefix_sharing=True`` (default on CPU, as in the engine): responses with
  identical prompt ids share one prompt forward (left-padded, KV cache kept);
  the replies then run on copies of their prompt's cache rows, in groups of
  similar length, right-padded after the reply. A set of k responses costs one
  prompt pass and k reply passes.
- ``prefix_sharing=False`` (default on GPU): one left-padded
  ``prompt + reply[:-1]`` sequence per response; the ``n`` states predicting
  an ``n``-token reply are its last ``n`` columns.

Batches are sorted by length and fill the engine's token and attention
budgets; an out-of-memory error splits the batch in two and retries.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from curate.scores.engine import (_cache_rows, _decoder_and_head, _is_oom, _right_pad, default_attention_budget,
                                  default_token_budget, left_pad, reply_groups, resolve_prefix_sharing)
from curate.scores.logps import span_sum


def _batches(items: Sequence[int], cost: Callable[[list[int]], tuple[int, int]], token_budget: int,
             attention_budget: int | None) -> list[list[int]]:
    """Cut ``items`` (already longest first) into batches whose (tokens, attention) cost fits the budgets."""
    batches: list[list[int]] = []
    for item in items:
        if batches:
            tokens, attention = cost(batches[-1] + [item])
            if tokens <= token_budget and (attention_budget is None or attention <= attention_budget):
                batches[-1].append(item)
                continue
        batches.append([item])
    return batches


def _forward_full(model, seqs: Sequence[Sequence[int]], reply_lengths: Sequence[int]) -> torch.Tensor:
    decoder, _ = _decoder_and_head(model)
    device = next(model.parameters()).device
    ids, mask, positions = left_pad(seqs, device)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    keep = torch.arange(hidden.shape[1], device=device).unsqueeze(0) >= (
        hidden.shape[1] - torch.tensor(reply_lengths, device=device)).unsqueeze(1)
    return torch.where(keep.unsqueeze(-1), hidden.float(), 0.0).sum(1).cpu()


def _forward_shared(model, prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]],
                    prompt_of: Sequence[int]) -> torch.Tensor:
    """Sums for ``replies`` (reply r continues ``prompts[prompt_of[r]]``), each prompt run once."""
    decoder, _ = _decoder_and_head(model)
    device = next(model.parameters()).device
    ids, mask, positions = left_pad(prompts, device)
    prompt_out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    last_prompt_state = prompt_out.last_hidden_state[:, -1]  # left padding: last column
    fed = [r[:-1] for r in replies]  # the end-of-turn token's own state is never used
    fed_lens = [len(f) for f in fed]
    states = torch.zeros(len(replies), 1 + max(fed_lens), last_prompt_state.shape[-1],
                         dtype=last_prompt_state.dtype, device=device)
    states[:, 0] = last_prompt_state[torch.tensor(prompt_of, device=device)]
    for group in reply_groups(fed_lens):
        prompt_rows = torch.tensor([prompt_of[row] for row in group], device=device)
        width = fed_lens[group[0]]
        lens = torch.tensor([fed_lens[row] for row in group], device=device)
        reply_mask = (torch.arange(width, device=device).unsqueeze(0) < lens.unsqueeze(1)).long()
        out = decoder(
            input_ids=_right_pad([fed[row] for row in group], width).to(device),
            attention_mask=torch.cat([mask[prompt_rows], reply_mask], dim=1),
            position_ids=mask.sum(1)[prompt_rows].unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0),
            past_key_values=_cache_rows(prompt_out.past_key_values, prompt_rows, model.config),
            use_cache=True,
        )
        states[torch.tensor(group, device=device), 1: 1 + width] = out.last_hidden_state
    lengths = torch.tensor([len(r) for r in replies], device=device)
    return span_sum(states, torch.zeros_like(lengths), lengths).cpu()


def pool_replies(model, encoded: Sequence[tuple[Sequence[int], Sequence[int]]], *, token_budget: int | None = None,
                 prefix_sharing: bool | None = None, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
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
            return rows, _forward_shared(model, [prompts[g] for g in groups], [encoded[i][1] for i in rows],
                                         prompt_of)
    else:
        seqs = [list(p) + list(r[:-1]) for p, r in encoded]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)

        def cost(items: list[int]) -> tuple[int, int]:
            width = len(seqs[items[0]])
            return len(items) * width, len(items) * width * width

        def run(items: list[int]) -> tuple[list[int], torch.Tensor]:
            return items, _forward_full(model, [seqs[i] for i in items], [len(encoded[i][1]) for i in items])

    pending = _batches(order, cost, budget, attention_budget)
    out: torch.Tensor | None = None
    with torch.inference_mode():
        while pending:
            batch = pending.pop(0)
            try:
                rows, sums = run(batch)
            except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not _is_oom(exc) or len(batch) == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                pending[:0] = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
                continue
            if out is None:
                out = torch.empty(len(encoded), sums.shape[1], dtype=torch.float32)
            out[torch.tensor(rows)] = sums
            if on_batch is not None:
                on_batch(len(rows))
    return out if out is not None else torch.empty(0, 0)
