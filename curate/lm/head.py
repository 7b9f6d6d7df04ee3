"""Log-probs through the model's own output head and its own logit post-processing.

Causal LMs do more than ``lm_head(h)``: Gemma-2/3 soft-cap the logits
(``cap * tanh(logits / cap)``), Granite divides by ``logits_scaling``, Cohere
multiplies by ``logit_scale``. Rather than list such rules, :func:`head_logits`
runs the model's own ``forward`` with its decoder swapped for one that returns
the given states, so whatever the forward does after the decoder is applied,
for any Hugging Face causal LM. The head runs in fp32 (bf16 logits round away
~0.1 nats per token) and outside autocast.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor


def unwrap(model):
    """The causal LM inside DDP / PEFT wrappers."""
    model = getattr(model, "module", model)
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


class _GivenStates(torch.nn.Module):
    """Stands in for the decoder: returns the states it was given."""

    def __init__(self, states: Tensor):
        super().__init__()
        self.states = states

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Output

        return Output(last_hidden_state=self.states)  # every field a causal LM may read


class _Fp32Head(torch.nn.Module):
    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.weight = head.weight
        self.bias = getattr(head, "bias", None)

    def forward(self, states: Tensor) -> Tensor:
        bias = self.bias.float() if self.bias is not None else None
        return torch.nn.functional.linear(states.float(), self.weight.float(), bias)


def _child_name(parent: torch.nn.Module, child: torch.nn.Module) -> str:
    for name, module in parent.named_children():
        if module is child:
            return name
    raise ValueError(f"{type(parent).__name__} has no direct child {type(child).__name__}")


@contextmanager
def _swapped(model, states: Tensor):
    decoder_name = model.base_model_prefix
    head_name = _child_name(model, model.get_output_embeddings())
    decoder, head = getattr(model, decoder_name), getattr(model, head_name)
    # plain __dict__ writes: nn.Module.__setattr__ would re-register and might re-tie weights
    model._modules[decoder_name] = _GivenStates(states)
    model._modules[head_name] = _Fp32Head(head)
    try:
        yield
    finally:
        model._modules[decoder_name], model._modules[head_name] = decoder, head


def head_logits(model, states: Tensor) -> Tensor:
    """fp32 logits the model's own forward gives for final-layer ``states [..., d]`` (``[..., V]``)."""
    model = unwrap(model)
    flat = states.reshape(1, -1, states.shape[-1])
    dummy = torch.zeros(flat.shape[:2], dtype=torch.long, device=states.device)
    with _swapped(model, flat), torch.autocast(states.device.type, enabled=False):
        logits = model(input_ids=dummy, use_cache=False).logits
    return logits.float().reshape(*states.shape[:-1], -1)


def token_logps(model, states: Tensor, targets: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """log p(target | state) for ``states [..., d]`` and ``targets [...]``, fp32 ``[...]``.

    ``chunk_size`` positions at a time (default: all), so a large batch never
    holds an ``[M, vocab]`` fp32 matrix at once.
    """
    flat_states, flat_targets = states.reshape(-1, states.shape[-1]), targets.reshape(-1)
    step = chunk_size or max(1, flat_states.shape[0])
    out = []
    for lo in range(0, flat_states.shape[0], step):
        out.append(logits_logps(head_logits(model, flat_states[lo:lo + step]), flat_targets[lo:lo + step]))
    if not out:
        return torch.zeros(targets.shape, dtype=torch.float32, device=states.device)
    return torch.cat(out).reshape(targets.shape)


def logits_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) in fp32 from logits: ``[..., V], [...] -> [...]``."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
