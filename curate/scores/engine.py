"""Batch planning and per-pair outputs behind `curate score` (the forward itself is :mod:`curate.lm`).

For every pair it returns, per reply, the fp32 sum of the last-layer hidden
states at the positions that predict the reply (CHES), the last of those
states (the hidden-inner-product baseline), the same sum at the probe layers
side by side (the reward heads' features: :func:`curate.lm.probe_layers`)
and, when asked, the summed log-prob of the reply through the model's own head
and logit post-processing (:func:`curate.lm.token_logps`, fp32, reply
positions only).

``prefix_sharing`` is :func:`curate.lm.reply_states`' ``shared_prompt``.
``None`` picks by device: on where compute is the limit (CPU, measured 2x over
the bare full forward there), off on GPUs, where a small model is bound by
launches and masked attention over the copied cache, and the full forward
measured faster (benchmarks/bench_ches.py, H100).

Batches are formed by sorting pairs by length and filling a token budget;
on a GPU an out-of-memory error halves the budget and retries.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from curate.lm import EncodedPair, pair_rows, reply_states, token_logps
from curate.scores.logps import span_sum

# Tokens per batch on CPU; larger batches stop paying off there and cost memory.
CPU_TOKEN_BUDGET = 4096
# Starting token budget on an accelerator; halved on out-of-memory.
GPU_TOKEN_BUDGET = 131072
# Query x key positions per batch on CPU. Attention there materialises a
# [rows, heads, L, L] score matrix, so at a fixed token budget a batch of a few
# long sequences needs more memory than many short ones: peak memory followed
# the longest pair of the dataset (687 MiB with pairs up to 488 tokens, 927 MiB
# up to 967). Capping rows x L^2 keeps the peak at what 512-token sequences
# cost. GPU attention kernels do not materialise it (no cap there).
CPU_ATTENTION_BUDGET = CPU_TOKEN_BUDGET * 512
# Reply positions per fp32 vocabulary projection. On CPU the [chunk, vocab] logits
# and their log-softmax were the largest transient of a batch (2 x 201 MB at
# 1,024 positions with SmolLM2's 49k vocabulary), so batches of short prompts,
# which hold many reply tokens, set the peak; 256 positions cost no speed there.
LOGIT_CHUNK_CPU = 256
LOGIT_CHUNK_GPU = 1024


OUTPUT_KEYS = ("sum_chosen", "sum_rejected", "last_chosen", "last_rejected", "probe_chosen", "probe_rejected",
               "logp_chosen", "logp_rejected")
def batch_cost(pairs: Sequence[EncodedPair], prefix_sharing: bool = True) -> int:
    """Tokens one batch of these pairs runs through the model, padding included.

    With prefix sharing: the left-padded prompts once, then every reply on its
    own (replies run in groups of similar length, so their padding is small
    and not counted). Without: both full sequences, padded to the longest.
    """
    prompt_len = max(len(p.prompt) for p in pairs)
    if prefix_sharing:
        return len(pairs) * prompt_len + sum(len(p.chosen) + len(p.rejected) for p in pairs)
    reply_len = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    return 2 * len(pairs) * (prompt_len + reply_len)


def attention_cost(pairs: Sequence[EncodedPair], prefix_sharing: bool = True) -> int:
    """Rows x (longest sequence)^2 of a batch: the size of its attention score matrix per head."""
    longest = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
    rows = len(pairs) if prefix_sharing else 2 * len(pairs)
    return rows * longest * longest


def plan_batches(pairs: Sequence[EncodedPair], *, token_budget: int, batch_size: int | None = None,
                 prefix_sharing: bool = True, indices: Sequence[int] | None = None,
                 attention_budget: int | None = None) -> list[list[int]]:
    """Group pair indices (all, or ``indices``) into batches of similar length.

    Pairs are sorted by (prompt length, reply lengths), longest first, and cut
    into batches of ``batch_size`` pairs, or, when it is None, of as many pairs
    as fit ``token_budget`` padded tokens and, if given, ``attention_budget``
    (:func:`attention_cost`), at least one pair per batch.
    """
    order = sorted(
        range(len(pairs)) if indices is None else indices,
        key=lambda i: (len(pairs[i].prompt), len(pairs[i].chosen) + len(pairs[i].rejected)),
        reverse=True,
    )
    if batch_size is not None:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]

    def cost(candidate: list[int]) -> tuple[int, int]:
        batch = [pairs[i] for i in candidate]
        return batch_cost(batch, prefix_sharing), attention_cost(batch, prefix_sharing)

    return greedy_batches(order, cost, token_budget, attention_budget)


def greedy_batches(items: Sequence[int], cost: Callable[[list[int]], tuple[int, int]], token_budget: int,
                   attention_budget: int | None) -> list[list[int]]:
    """Cut ``items`` (in order) into batches whose (tokens, attention) cost fits the budgets, at least one item each."""
    batches: list[list[int]] = []
    for item in items:
        if batches:
            tokens, attention = cost(batches[-1] + [item])
            if tokens <= token_budget and (attention_budget is None or attention <= attention_budget):
                batches[-1].append(item)
                continue
        batches.append([item])
    return batches


def forward_batch(
    model, pairs: Sequence[EncodedPair], *, want_logps: bool = True, prefix_sharing: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Score one batch of pairs; tensors on CPU, one row per pair, in input order."""
    prompts, replies, owner = pair_rows(pairs)
    out = reply_states(model, prompts, replies, owner, shared_prompt=resolve_prefix_sharing(model, prefix_sharing),
                       probe=True)
    states, lengths = out.states, out.lengths
    rows = torch.arange(len(replies), device=states.device)
    zeros = torch.zeros_like(lengths)
    scores = {"sum": span_sum(states, zeros, lengths), "last": states[rows, lengths - 1].float()}
    if out.probe is not None:
        scores["probe"] = span_sum(out.probe, zeros, lengths)
    if want_logps:
        valid = out.valid
        targets = torch.zeros(valid.shape, dtype=torch.long)
        for row, reply in enumerate(replies):
            targets[row, :len(reply)] = torch.as_tensor(reply, dtype=torch.long)
        chunk = LOGIT_CHUNK_CPU if states.device.type == "cpu" else LOGIT_CHUNK_GPU
        with torch.inference_mode():
            token_lp = token_logps(model, states[valid], targets.to(states.device)[valid], chunk_size=chunk)
        per_row = torch.zeros(len(replies), dtype=torch.float32, device=states.device)
        scores["logp"] = per_row.index_add_(0, valid.nonzero()[:, 0], token_lp)
    n = len(pairs)
    return {f"{name}_{side}": value[rows].cpu() for name, value in scores.items()
            for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n)))}


def recover_from_oom(exc: RuntimeError, batch_len: int) -> None:
    """Re-raise ``exc`` unless it is an out-of-memory error that a smaller batch may avoid; then free the cache."""
    out_of_memory = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
    if not out_of_memory or batch_len == 1:
        raise exc
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_prefix_sharing(model, prefix_sharing: bool | None) -> bool:
    """``None`` means: share prompts on CPU, not on accelerators (see the module docstring)."""
    if prefix_sharing is not None:
        return prefix_sharing
    return next(model.parameters()).device.type == "cpu"


def default_token_budget(model) -> int:
    device = next(model.parameters()).device
    return CPU_TOKEN_BUDGET if device.type == "cpu" else GPU_TOKEN_BUDGET


def default_attention_budget(model) -> int | None:
    return CPU_ATTENTION_BUDGET if next(model.parameters()).device.type == "cpu" else None


def score_batches(model, pairs: Sequence[EncodedPair], *, want_logps: bool = True, prefix_sharing: bool | None = None,
                  batch_size: int | None = None, token_budget: int | None = None,
                  ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(pair indices, outputs)`` batch by batch, longest pairs first.

    With ``batch_size=None`` batches fill ``token_budget`` padded tokens
    (default: a fixed budget on CPU, a large one on GPU). Out-of-memory
    halves the failed batch (and the budget or batch size for the rest) and
    retries, down to one pair per batch.
    """
    budget = token_budget or default_token_budget(model)
    attention_budget = default_attention_budget(model)
    prefix_sharing = resolve_prefix_sharing(model, prefix_sharing)
    pending = plan_batches(pairs, token_budget=budget, batch_size=batch_size, prefix_sharing=prefix_sharing,
                           attention_budget=attention_budget)
    while pending:
        indices = pending.pop(0)
        try:
            out = forward_batch(model, [pairs[i] for i in indices], want_logps=want_logps, prefix_sharing=prefix_sharing)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            recover_from_oom(exc, len(indices))
            # halve what failed and re-plan everything not yet done
            budget = max(1, batch_cost([pairs[i] for i in indices], prefix_sharing) // 2)
            if batch_size is not None:
                batch_size = max(1, len(indices) // 2)
            remaining = indices + [i for batch in pending for i in batch]
            pending = plan_batches(pairs, token_budget=budget, batch_size=batch_size, prefix_sharing=prefix_sharing,
                                   indices=remaining, attention_budget=attention_budget)
            continue
        yield indices, out


def score_encoded(model, pairs: Sequence[EncodedPair], *, on_batch: Callable[[list[int]], None] | None = None,
                  **options) -> dict[str, torch.Tensor]:
    """Score all pairs; returns the engine outputs stacked in input order (``on_batch(indices)`` after each batch).

    ``options``: those of :func:`score_batches`.
    """
    results: dict[str, torch.Tensor] = {}
    for indices, out in score_batches(model, pairs, **options):
        index = torch.tensor(indices)
        for name, value in out.items():
            if name not in results:
                results[name] = torch.empty((len(pairs), *value.shape[1:]), dtype=value.dtype)
            results[name][index] = value
        if on_batch is not None:
            on_batch(indices)
    return results
