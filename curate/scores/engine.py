"""The batched forward engine behind `curate score`.

For every pair it returns, per reply, the fp32 sum of the last-layer hidden
states at the positions that predict the reply (CHES), the last of those
states (the hidden-inner-product baseline), the same sum at a probe layer two
thirds of the way up (the reward heads' features: :func:`probe_layer`) and,
when asked, the summed log-prob of the reply. Only those two layers' states
are kept, and ``lm_head`` runs only on reply positions, only when log-probs
are asked for, and in fp32.

How a batch runs with ``prefix_sharing=True`` (the default on CPU):

1. the prompts, left-padded, go through the decoder once, keeping the KV cache;
2. the replies (without their final end-of-turn token, whose own state is
   never used) run on top of that cache in groups of similar length, each
   group over a copy of the cache rows of its pairs, right-padded after the
   reply.

Left padding puts every prompt's last token in the last column, and right
padding after a reply cannot influence earlier positions of a causal model,
so every mask is built from lengths alone. ``prefix_sharing=False`` runs each
(prompt, reply) as one left-padded sequence instead (two forwards per pair).
``prefix_sharing=None`` picks by device: on where compute is the limit (CPU,
measured 2x over the bare full forward there), off on GPUs, where a small
model is bound by launches and masked attention over the copied cache, and
the full forward measured faster (benchmarks/bench_ches.py, H100).

Batches are formed by sorting pairs by length and filling a token budget;
on a GPU an out-of-memory error halves the budget and retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from curate.scores.logps import span_sum, token_logprobs

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


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one pair; each reply ends with the end-of-turn token."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]


OUTPUT_KEYS = ("sum_chosen", "sum_rejected", "last_chosen", "last_rejected", "probe_chosen", "probe_rejected",
               "logp_chosen", "logp_rejected")
# Depth of the probe layer. Linear probes read preferences best from middle
# layers: on HH harmless, heads on SmolLM2's mean reply states reached OOF AUC
# 0.686 / 0.705 / 0.722 / 0.721 / 0.714 / 0.698 at layers 4 / 12 / 16 / 20 /
# 24 / 30 (last) of 30. Fixed as a fraction of depth, not tuned per model.
PROBE_DEPTH = 2 / 3


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


def reply_groups(lengths: Sequence[int], ratio: float = 0.7) -> list[list[int]]:
    """Split rows into groups of similar length, longest first, skipping zero lengths.

    A row joins the current group while its length is at least ``ratio`` times
    the group's longest, so right padding stays under ``1 - ratio`` per group.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: lengths[i], reverse=True)
    groups: list[list[int]] = []
    for row in order:
        if groups and lengths[row] >= ratio * lengths[groups[-1][0]]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def plan_batches(
    pairs: Sequence[EncodedPair],
    *,
    token_budget: int,
    batch_size: int | None = None,
    prefix_sharing: bool = True,
    indices: Sequence[int] | None = None,
    attention_budget: int | None = None,
) -> list[list[int]]:
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
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        candidate = current + [index]
        if batch_size is not None:
            fits = len(candidate) <= batch_size
        else:
            batch = [pairs[i] for i in candidate]
            fits = batch_cost(batch, prefix_sharing) <= token_budget and (
                attention_budget is None or attention_cost(batch, prefix_sharing) <= attention_budget)
        if current and not fits:
            batches.append(current)
            candidate = [index]
        current = candidate
    if current:
        batches.append(current)
    return batches


def left_pad(seqs: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (counting from each sequence's start)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _right_pad(seqs: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids


def _decoder_blocks(model) -> Sequence[torch.nn.Module] | None:
    """The list of transformer blocks of a causal LM (Llama-style ``layers``, GPT-2-style ``h``)."""
    decoder = model.base_model
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks
    return None


def probe_layer(model) -> int | None:
    """The ``hidden_states`` index the probe reads: block k's output is ``hidden_states[k]``.

    ``round(PROBE_DEPTH * n_blocks)``, kept below the last block (whose
    ``hidden_states`` entry is after the final norm); None for one-block models
    or architectures whose blocks are not found (the probe is then skipped).
    """
    blocks = _decoder_blocks(model)
    if blocks is None or len(blocks) < 2:
        return None
    return min(len(blocks) - 1, max(1, round(PROBE_DEPTH * len(blocks))))


class _ProbeTap:
    """Keeps the output of the probe layer's block for each decoder forward inside the block."""

    def __init__(self, model):
        self.layer = probe_layer(model)
        self.block = _decoder_blocks(model)[self.layer - 1] if self.layer else None
        self.last: torch.Tensor | None = None

    def __enter__(self) -> "_ProbeTap":
        if self.block is not None:
            self.handle = self.block.register_forward_hook(self._keep)
        return self

    def _keep(self, module, args, output) -> None:
        self.last = output[0] if isinstance(output, tuple) else output

    def __exit__(self, *exc) -> None:
        if self.block is not None:
            self.handle.remove()


def _decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (ending in the final norm) and the unembedding of a causal LM."""
    return model.base_model, model.get_output_embeddings()


def _fp32_head(lm_head: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The unembedding computed in fp32: bf16 logits would round away ~0.1 nats per token."""
    weight = lm_head.weight.float()
    bias = lm_head.bias.float() if getattr(lm_head, "bias", None) is not None else None
    return lambda states: torch.nn.functional.linear(states.float(), weight, bias)


def _reply_scores(
    states: torch.Tensor,
    replies: Sequence[Sequence[int]],
    lm_head: torch.nn.Module | None,
    probe_states: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Sums, last states, probe-layer sums and log-probs from the states that predict each reply.

    ``states [R, W, d]`` (and ``probe_states``, the same positions at the
    probe layer): row r holds, from column 0, the states predicting reply r's
    tokens (its last prompt token, then its tokens but the last).
    """
    device = states.device
    lengths = torch.tensor([len(r) for r in replies], device=device)
    zeros = torch.zeros_like(lengths)
    rows = torch.arange(len(replies), device=device)
    out = {
        "sum": span_sum(states, zeros, lengths),
        "last": states[rows, lengths - 1].float(),
    }
    if probe_states is not None:
        out["probe"] = span_sum(probe_states, zeros, lengths)
    if lm_head is not None:
        targets = _right_pad(replies, states.shape[1]).to(device)
        valid = torch.arange(states.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)
        token_lp = token_logprobs(states[valid], targets[valid], _fp32_head(lm_head),
                                  chunk_size=LOGIT_CHUNK_CPU if device.type == "cpu" else LOGIT_CHUNK_GPU)
        per_row = torch.zeros(len(replies), dtype=torch.float32, device=device)
        out["logp"] = per_row.index_add_(0, valid.nonzero()[:, 0], token_lp)
    return out


def _cache_rows(cache, rows: torch.Tensor, config):
    """A new KV cache holding only ``rows`` of ``cache``, which stays intact for the other groups."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in cache.layers], config=config)


def _forward_shared(model, pairs: Sequence[EncodedPair], want_logps: bool) -> dict[str, torch.Tensor]:
    decoder, lm_head = _decoder_and_head(model)
    device = next(model.parameters()).device
    ids, mask, positions = left_pad([p.prompt for p in pairs], device)
    with _ProbeTap(model) as tap:
        prompt_out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        prompt_probe = tap.last[:, -1] if tap.layer else None
        last_prompt_state = prompt_out.last_hidden_state[:, -1]  # left padding: last column

        # rows 2i / 2i+1 are the chosen / rejected reply of pair i
        replies = [r for p in pairs for r in (p.chosen, p.rejected)]
        fed = [r[:-1] for r in replies]  # the end-of-turn token's own state is never used
        fed_lens = [len(f) for f in fed]
        states = torch.zeros(len(replies), 1 + max(fed_lens), last_prompt_state.shape[-1],
                             dtype=last_prompt_state.dtype, device=device)
        states[:, 0] = last_prompt_state.repeat_interleave(2, dim=0)
        probe_states = None
        if prompt_probe is not None:
            probe_states = torch.zeros_like(states)
            probe_states[:, 0] = prompt_probe.repeat_interleave(2, dim=0)
        for group in reply_groups(fed_lens):
            pair_rows = torch.tensor([row // 2 for row in group], device=device)
            cache = _cache_rows(prompt_out.past_key_values, pair_rows, model.config)
            width = fed_lens[group[0]]
            lens = torch.tensor([fed_lens[row] for row in group], device=device)
            reply_mask = (torch.arange(width, device=device).unsqueeze(0) < lens.unsqueeze(1)).long()
            prompt_lens = mask.sum(1)[pair_rows]
            reply_out = decoder(
                input_ids=_right_pad([fed[row] for row in group], width).to(device),
                attention_mask=torch.cat([mask[pair_rows], reply_mask], dim=1),
                position_ids=prompt_lens.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
            )
            rows = torch.tensor(group, device=device)
            states[rows, 1 : 1 + width] = reply_out.last_hidden_state
            if probe_states is not None:
                probe_states[rows, 1 : 1 + width] = tap.last
    scores = _reply_scores(states, replies, lm_head if want_logps else None, probe_states)
    return _split_chosen_rejected(scores)


def _forward_separate(model, pairs: Sequence[EncodedPair], want_logps: bool) -> dict[str, torch.Tensor]:
    decoder, lm_head = _decoder_and_head(model)
    device = next(model.parameters()).device
    replies = [r for p in pairs for r in (p.chosen, p.rejected)]
    seqs = [list(p.prompt) + list(r[:-1]) for p in pairs for r in (p.chosen, p.rejected)]
    ids, mask, positions = left_pad(seqs, device)
    with _ProbeTap(model) as tap:
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    # with left padding the n states predicting an n-token reply are the last n columns
    lengths = torch.tensor([len(r) for r in replies], device=device)
    gather = (hidden.shape[1] - lengths).unsqueeze(1) + torch.arange(max(len(r) for r in replies), device=device)
    gather = gather.clamp(max=hidden.shape[1] - 1)
    rows = torch.arange(len(seqs), device=device).unsqueeze(1)
    probe_states = tap.last[rows, gather] if tap.layer else None
    scores = _reply_scores(hidden[rows, gather], replies, lm_head if want_logps else None, probe_states)
    return _split_chosen_rejected(scores)


def _split_chosen_rejected(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in scores.items():
        out[f"{name}_chosen"] = value[0::2].cpu()
        out[f"{name}_rejected"] = value[1::2].cpu()
    return out


def forward_batch(
    model, pairs: Sequence[EncodedPair], *, want_logps: bool = True, prefix_sharing: bool | None = None
) -> dict[str, torch.Tensor]:
    """Score one batch of pairs; tensors on CPU, one row per pair, in input order."""
    if any(len(p.prompt) == 0 or len(p.chosen) == 0 or len(p.rejected) == 0 for p in pairs):
        raise ValueError("every pair needs a non-empty prompt and replies that end with the end-of-turn token")
    forward = _forward_shared if resolve_prefix_sharing(model, prefix_sharing) else _forward_separate
    with torch.inference_mode():
        return forward(model, pairs, want_logps)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


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


def score_batches(
    model,
    pairs: Sequence[EncodedPair],
    *,
    want_logps: bool = True,
    prefix_sharing: bool | None = None,
    batch_size: int | None = None,
    token_budget: int | None = None,
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
            if not _is_oom(exc) or len(indices) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # halve what failed and re-plan everything not yet done
            budget = max(1, batch_cost([pairs[i] for i in indices], prefix_sharing) // 2)
            if batch_size is not None:
                batch_size = max(1, len(indices) // 2)
            remaining = indices + [i for batch in pending for i in batch]
            pending = plan_batches(
                pairs, token_budget=budget, batch_size=batch_size, prefix_sharing=prefix_sharing, indices=remaining,
                attention_budget=attention_budget,
            )
            continue
        yield indices, out


def score_encoded(
    model,
    pairs: Sequence[EncodedPair],
    *,
    want_logps: bool = True,
    prefix_sharing: bool | None = None,
    batch_size: int | None = None,
    token_budget: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Score all pairs; returns the engine outputs stacked in input order."""
    results: dict[str, torch.Tensor] = {}
    for indices, out in score_batches(
        model, pairs, want_logps=want_logps, prefix_sharing=prefix_sharing,
        batch_size=batch_size, token_budget=token_budget,
    ):
        index = torch.tensor(indices)
        for name, value in out.items():
            if name not in results:
                results[name] = torch.empty((len(pairs), *value.shape[1:]), dtype=value.dtype)
            results[name][index] = value
        if on_batch is not None:
            on_batch(len(indices))
    return results
