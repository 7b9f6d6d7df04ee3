"""One batched forward: the states that predict each reply, over shared prompts or full sequences.

Rows are (prompt, reply) with ``owner[r]`` naming row r's prompt, so a pair's
chosen and rejected reply read one prompt. Row r, column j of the result is
the state that predicts ``replies[r][j]``: the last prompt token's state, then
the states of the reply's own tokens but the last (an end-of-turn token whose
own state is never used).

``shared_prompt=True``:

1. the prompts run once, right-padded, keeping the KV cache;
2. the replies run on top of their prompts' cache rows, right-padded too.

Both passes pad to a fixed bucket width (the next multiple of WIDTH_BUCKET) and
run one bucket at a time, so a row's arithmetic depends on its own lengths, not
on what it is batched with. Under bf16 that matters: CPU and GPU attention
kernels split work by sequence width, and a pair scored in a batch of long
prompts differed by up to 0.55 nats from the same pair trained in another
batch; with buckets, scoring and training agree to ~3e-5 nats, so training
reuses scored reference log-probs. Right padding cannot influence earlier
positions of a causal model, so every mask is built from lengths alone (never
from ``ids != pad``: SmolLM2 pads with its end-of-turn token).

``shared_prompt=False`` runs each (prompt, reply) as one sequence instead,
bucketed the same way; it alone can return every layer's states (SparsePO masks). ``grad`` switches autograd
on (training) or runs under ``inference_mode`` (scoring, eval); gradients flow
through the cache into the prompt pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from curate.lm.head import unwrap

# Depth of the probe layer. Linear probes read preferences best from middle
# layers: on HH harmless, heads on SmolLM2's mean reply states reached OOF AUC
# 0.686 / 0.705 / 0.722 / 0.721 / 0.714 / 0.698 at layers 4 / 12 / 16 / 20 /
# 24 / 30 (last) of 30. Fixed as a fraction of depth, not tuned per model.
PROBE_DEPTH = 2 / 3
# The reward heads read the best three of those side by side (layers 16, 20, 24
# of SmolLM2's 30), one block each: on 512 HH harmless pairs the ensemble's OOF
# AUC went from 0.705 (layer 20 alone) to 0.712, and from 0.693 to 0.700 on two
# 256-pair halves (benchmarks/exp_ensemble_hh.py, results/exp_ensemble_hh_layers_*).
PROBE_DEPTHS = (8 / 15, PROBE_DEPTH, 4 / 5)
WIDTH_BUCKET = 32  # tokens; see the module docstring


def left_pad(seqs: Sequence[Sequence[int]], device, pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded ids, attention mask and position ids (counting from each sequence's start)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def right_pad(seqs: Sequence[Sequence[int]], width: int, pad_id: int = 0) -> Tensor:
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids


def decoder_blocks(model) -> Sequence[torch.nn.Module] | None:
    """The transformer blocks of a causal LM (Llama-style ``layers``, GPT-2-style ``h``)."""
    decoder = unwrap(model).base_model
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
    layers = probe_layers(model, (PROBE_DEPTH,))
    return layers[0] if layers else None


def probe_layers(model, depths=PROBE_DEPTHS) -> tuple[int, ...]:
    """The distinct ``hidden_states`` indices at ``depths`` (fractions of the blocks), in order, as in
    :func:`probe_layer`; () where that has none."""
    blocks = decoder_blocks(model)
    if blocks is None or len(blocks) < 2:
        return ()
    return tuple(sorted({min(len(blocks) - 1, max(1, round(d * len(blocks)))) for d in depths}))


class _ProbeTap:
    """Keeps the outputs of the probe layers' blocks for each decoder forward inside the block.

    ``layers``: True for :func:`probe_layers`, or ``hidden_states`` indices;
    ``last`` is their outputs side by side on the feature axis, [..., len(layers) * d].
    """

    def __init__(self, model, layers: bool | Sequence[int]):
        if layers is True:
            layers = probe_layers(model)
        self.layers = tuple(layers or ())
        blocks = decoder_blocks(model) if self.layers else None
        self.blocks = [blocks[k - 1] for k in self.layers]
        self.outputs: dict[int, Tensor] = {}

    def __enter__(self) -> "_ProbeTap":
        self.handles = [block.register_forward_hook(self._keeper(k)) for k, block in zip(self.layers, self.blocks)]
        return self

    def _keeper(self, layer: int):
        def keep(module, args, output) -> None:
            self.outputs[layer] = output[0] if isinstance(output, tuple) else output
        return keep

    @property
    def last(self) -> Tensor:
        return torch.cat([self.outputs[k] for k in self.layers], dim=-1)

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class ReplyStates:
    """States predicting each reply token, row r left-aligned: columns ``< lengths[r]`` are real."""

    states: Tensor  # [R, W, d], the last layer (after the final norm)
    lengths: Tensor  # [R]
    probe: Tensor | None = None  # [R, W, k * d]: the k probe layers side by side (:func:`probe_layers`)
    layers: list[Tensor] | None = None  # every block's output, L x [R, W, d] (full sequences only)

    @property
    def valid(self) -> Tensor:
        columns = torch.arange(self.states.shape[1], device=self.states.device)
        return columns.unsqueeze(0) < self.lengths.unsqueeze(1)


def _cache_rows(cache, rows: Tensor, config):
    """A new KV cache holding only ``rows`` of ``cache``, which stays intact for the other groups."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in cache.layers], config=config)


def bucket_width(length: int) -> int:
    """The width a prompt or reply of ``length`` tokens is padded to: the next multiple of WIDTH_BUCKET."""
    return max(1, -(-length // WIDTH_BUCKET)) * WIDTH_BUCKET


def _shared(model, prompts, replies, owner, probe) -> ReplyStates:
    decoder, config = unwrap(model).base_model, unwrap(model).config
    device = next(model.parameters()).device
    fed = [r[:-1] for r in replies]
    width = max(len(r) for r in replies)
    states = probe_states = None
    with _ProbeTap(model, probe) as tap:
        for prompt_width, prompt_rows in _buckets(range(len(prompts)), lambda o: len(prompts[o])).items():
            lens = torch.tensor([len(prompts[o]) for o in prompt_rows], device=device)
            mask = _length_mask(lens, prompt_width)
            prompt_out = decoder(input_ids=right_pad([prompts[o] for o in prompt_rows], prompt_width).to(device),
                                 attention_mask=mask, position_ids=_positions(len(prompt_rows), prompt_width, device),
                                 use_cache=True)
            if states is None:
                states = prompt_out.last_hidden_state.new_zeros(len(replies), width, prompt_out.last_hidden_state.shape[-1])
                if tap.layers:
                    probe_states = states.new_zeros(len(replies), width, tap.last.shape[-1])
            slot = {o: i for i, o in enumerate(prompt_rows)}
            rows = [r for r, o in enumerate(owner) if o in slot]
            slots = torch.tensor([slot[owner[r]] for r in rows], device=device)
            last = lens[slots] - 1  # each prompt's last token predicts its replies' first
            states[rows, 0] = prompt_out.last_hidden_state[slots, last]
            if probe_states is not None:
                probe_states[rows, 0] = tap.last[slots, last]
            for reply_width, reply_rows in _buckets([r for r in rows if len(fed[r])], lambda r: len(fed[r])).items():
                slots = torch.tensor([slot[owner[r]] for r in reply_rows], device=device)
                reply_lens = torch.tensor([len(fed[r]) for r in reply_rows], device=device)
                out = decoder(
                    input_ids=right_pad([fed[r] for r in reply_rows], reply_width).to(device),
                    attention_mask=torch.cat([mask[slots], _length_mask(reply_lens, reply_width)], dim=1),
                    position_ids=lens[slots].unsqueeze(1) + _positions(1, reply_width, device),
                    cache=_cache_rows(prompt_out.cache, slots, config),
                    use_cache=True,
                )
                n = int(reply_lens.max())
                states[reply_rows, 1:1 + n] = out.last_hidden_state[:, :n]
                if probe_states is not None:
                    probe_states[reply_rows, 1:1 + n] = tap.last[:, :n]
    lengths = torch.tensor([len(r) for r in replies], device=device)
    return ReplyStates(states, lengths, probe_states)


def _length_mask(lengths: Tensor, width: int) -> Tensor:
    return (torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)).long()


def _positions(rows: int, width: int, device) -> Tensor:
    return torch.arange(width, device=device).expand(rows, -1)


def _buckets(items, length) -> dict[int, list]:
    """``items`` grouped by :func:`bucket_width` of their ``length``, widest first."""
    groups: dict[int, list] = {}
    for item in items:
        groups.setdefault(bucket_width(length(item)), []).append(item)
    return dict(sorted(groups.items(), reverse=True))


def _full(model, prompts, replies, owner, probe, all_layers: bool) -> ReplyStates:
    decoder = unwrap(model).base_model
    device = next(model.parameters()).device
    seqs = [list(prompts[o]) + list(r[:-1]) for o, r in zip(owner, replies)]
    width = max(len(r) for r in replies)
    states = probe_states = layers = None
    with _ProbeTap(model, probe) as tap:
        for seq_width, rows in _buckets(range(len(seqs)), lambda r: len(seqs[r])).items():
            out = decoder(input_ids=right_pad([seqs[r] for r in rows], seq_width).to(device),
                          attention_mask=_length_mask(torch.tensor([len(seqs[r]) for r in rows], device=device), seq_width),
                          position_ids=_positions(len(rows), seq_width, device), use_cache=False,
                          output_hidden_states=all_layers)
            # the state predicting reply token j is at column len(prompt) - 1 + j
            starts = torch.tensor([len(prompts[owner[r]]) - 1 for r in rows], device=device)
            gather = (starts.unsqueeze(1) + torch.arange(width, device=device)).clamp(max=seq_width - 1)
            at = torch.arange(len(rows), device=device).unsqueeze(1), gather
            if states is None:
                states = out.last_hidden_state.new_zeros(len(replies), width, out.last_hidden_state.shape[-1])
                if tap.layers:
                    probe_states = states.new_zeros(len(replies), width, tap.last.shape[-1])
                if all_layers:
                    layers = [states.new_zeros(states.shape) for _ in out.hidden_states[1:]]
            states[rows] = out.last_hidden_state[at]
            if probe_states is not None:
                probe_states[rows] = tap.last[at]
            if layers is not None:
                for layer, hidden in zip(layers, out.hidden_states[1:]):
                    layer[rows] = hidden[at]
    lengths = torch.tensor([len(r) for r in replies], device=device)
    return ReplyStates(states, lengths, probe_states, layers)


def reply_states(model, prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]],
                 owner: Sequence[int], *, shared_prompt: bool, grad: bool = False, probe: bool | Sequence[int] = False,
                 all_layers: bool = False) -> ReplyStates:
    """The states predicting every reply (see the module docstring); ``owner[r]`` indexes ``prompts``."""
    if any(len(p) == 0 for p in prompts) or any(len(r) == 0 for r in replies):
        raise ValueError("every row needs a non-empty prompt and a reply that ends with the end-of-turn token")
    if all_layers and shared_prompt:
        raise ValueError("every layer's states need full sequences (shared_prompt=False)")
    with contextlib.nullcontext() if grad else torch.inference_mode():
        if shared_prompt:
            return _shared(model, prompts, replies, owner, probe)
        return _full(model, prompts, replies, owner, probe, all_layers)


def pair_rows(pairs) -> tuple[list, list, list[int]]:
    """(prompts, replies, owner) of encoded pairs: rows are every chosen reply, then every rejected one."""
    prompts = [p.prompt for p in pairs]
    replies = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return prompts, replies, list(range(len(pairs))) * 2
