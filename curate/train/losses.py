"""Preference losses as pure functions of tensors (methods.md §6).

Sequence-level losses take per-pair log-ratios r± = log π(y±|x) − log π_ref(y±|x)
(sums over reply tokens, end-of-turn token included) and return one loss per
pair, unreduced. Token-level losses (TDPO, SparsePO) take per-token terms.

Values match TRL's ``DPOTrainer`` for dpo ("sigmoid"), ipo, rdpo ("robust")
and hinge, and TRL <= 0.28's sigmoid loss with label smoothing for cdpo.

Every loss is one function registered by name with its paper and level
(:data:`REGISTRY`, :func:`register`); ``--loss NAME`` and
:func:`pair_losses` look it up there. Adding a sequence-level loss is one
decorated function ``(chosen_logratio [B], rejected_logratio [B], *, beta,
epsilon, chosen_len [B], rejected_len [B], label_confidence [B] | None) -> [B]``
(in this file or any module imported before training) plus a test pinning it to
hand values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor



@dataclass(frozen=True)
class Loss:
    name: str
    level: str  # "sequence": per-pair log-ratios in; "token": per-token terms in (TokenTerms)
    paper: str
    fn: Callable[..., Tensor]


REGISTRY: dict[str, Loss] = {}


def register(name: str, *, level: str, paper: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` as loss ``name``; ``level`` is "sequence" or "token"."""
    if level not in ("sequence", "token"):
        raise ValueError(f"level must be 'sequence' or 'token', got {level!r}")

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        REGISTRY[name] = Loss(name, level, paper, fn)
        return fn

    return add


def losses_of(level: str) -> tuple[str, ...]:
    return tuple(name for name, loss in REGISTRY.items() if loss.level == level)


def pair_losses(kind: str, chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, epsilon: float = 0.0,
                chosen_len: Tensor | None = None, rejected_len: Tensor | None = None,
                label_confidence: Tensor | None = None) -> Tensor:
    """One loss per pair ``[B]`` (no reduction) for the registered sequence-level loss ``kind``.

    ``chosen_logratio``, ``rejected_logratio``: r± ``[B]``; ``chosen_len``,
    ``rejected_len``: reply token counts ``[B]``; ``label_confidence``: per-pair
    confidence that the label is right ``[B]`` (dpo only).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_confidence is not None and kind != "dpo":
        raise ValueError("label_confidence (soft labels) goes with kind='dpo' only")
    loss = REGISTRY.get(kind)
    if loss is None or loss.level != "sequence":
        raise ValueError(f"unknown sequence loss {kind!r}; choose one of {', '.join(losses_of('sequence'))}")
    return loss.fn(chosen_logratio, rejected_logratio, beta=beta, epsilon=epsilon, chosen_len=chosen_len,
                   rejected_len=rejected_len, label_confidence=label_confidence)


@register("dpo", level="sequence", paper="Rafailov et al. 2023, Direct Preference Optimization, arXiv:2305.18290")
def dpo_losses(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float,
               label_confidence: Tensor | None = None, **_: Any) -> Tensor:
    """−log σ(βΔ), Δ = r⁺ − r⁻. With ``label_confidence`` c the soft-label loss
    −[c log σ(βΔ) + (1−c) log σ(−βΔ)]; c < 0.5 reverses the pair."""
    logits = beta * (chosen_logratio - rejected_logratio)
    if label_confidence is None:
        return -F.logsigmoid(logits)
    c = label_confidence.to(logits.dtype)
    return -(c * F.logsigmoid(logits) + (1 - c) * F.logsigmoid(-logits))


@register("ipo", level="sequence",
          paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences, "
                "arXiv:2310.12036")
def ipo_losses(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, chosen_len: Tensor | None = None,
               rejected_len: Tensor | None = None, **_: Any) -> Tensor:
    """(r⁺/N⁺ − r⁻/N⁻ − 1/(2β))², N± the reply token counts, as TRL averages per token."""
    if chosen_len is None or rejected_len is None:
        raise ValueError("ipo needs chosen_len and rejected_len (reply token counts)")
    per_token = chosen_logratio / chosen_len.clamp(min=1) - rejected_logratio / rejected_len.clamp(min=1)
    return (per_token - 1 / (2 * beta)) ** 2


@register("cdpo", level="sequence", paper="Mitchell 2023, A note on DPO with noisy preferences (conservative DPO)")
def cdpo_losses(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, epsilon: float = 0.0,
                **_: Any) -> Tensor:
    """−(1−ε) log σ(βΔ) − ε log σ(−βΔ): bounded, for a flip rate ε in [0, 1)."""
    _check_epsilon(epsilon, upper=1.0)
    logits = beta * (chosen_logratio - rejected_logratio)
    return -(1 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)


@register("rdpo", level="sequence", paper="Chowdhury et al. 2024, Provably Robust DPO, arXiv:2403.00409")
def rdpo_losses(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, epsilon: float = 0.0,
                **_: Any) -> Tensor:
    """[−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε): unbiased under flip rate ε < 0.5."""
    _check_epsilon(epsilon, upper=0.5)
    logits = beta * (chosen_logratio - rejected_logratio)
    return (-(1 - epsilon) * F.logsigmoid(logits) + epsilon * F.logsigmoid(-logits)) / (1 - 2 * epsilon)


@register("hinge", level="sequence", paper="Zhao et al. 2023, SLiC-HF, arXiv:2305.10425")
def hinge_losses(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, **_: Any) -> Tensor:
    """relu(1 − βΔ)."""
    return torch.relu(1 - beta * (chosen_logratio - rejected_logratio))


def _check_epsilon(epsilon: float, *, upper: float) -> None:
    if not 0.0 <= epsilon < upper:
        raise ValueError(f"epsilon (flip rate) must be in [0, {upper}), got {epsilon}")


def weighted_mean(losses: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of w_i · loss_i over the batch (plain mean without weights).

    Dividing by the batch size, not by Σw, keeps a weight's meaning absolute:
    a pair with weight 0.5 counts half as much as an unweighted pair in any batch.
    """
    if weights is None:
        return losses.mean()
    return (weights.to(losses.dtype) * losses).mean()


def sft_loss(chosen_token_logps: Tensor, chosen_valid: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of the chosen replies over the batch (TRL's "sft" / RPO term)."""
    valid = chosen_valid.to(chosen_token_logps.dtype)
    return -(chosen_token_logps * valid).sum() / valid.sum().clamp(min=1)


# (MADPO weights are computed by curation, curate.curation.madpo_weight, and arrive as the `weight` column.)


# ------------------------------------------------------------------ token level
class TokenTerms(NamedTuple):
    """Per-token quantities of one side (chosen or rejected) of a batch of pairs, all ``[B, T]``.

    ``logratio``: log π(y_t|·) − log π_ref(y_t|·); ``kl``: KL(π_ref(·|x,y<t) ‖ π(·|x,y<t));
    ``valid``: 1.0 on reply tokens, 0.0 on padding (built from lengths, never from pad ids).
    """

    logratio: Tensor
    kl: Tensor
    valid: Tensor


def token_kl(policy_logits: Tensor, reference_logits: Tensor) -> Tensor:
    """KL(π_ref ‖ π) per position over the vocabulary, ``[..., V] -> [...]``, in fp32.

    Uses log_softmax on both models (softmax().log() underflows to NaN).
    """
    policy_logp = policy_logits.float().log_softmax(-1)
    reference_logp = reference_logits.float().log_softmax(-1)
    return (reference_logp.exp() * (reference_logp - policy_logp)).sum(-1)


def _masked_sum(values: Tensor, valid: Tensor, mask: Tensor | None = None) -> Tensor:
    if mask is not None:
        values = mask * values
    return (values * valid).sum(-1)


@register("tdpo1", level="token", paper="Zeng et al. 2024, Token-level Direct Preference Optimization, arXiv:2404.11999")
def tdpo1_losses(chosen: TokenTerms, rejected: TokenTerms, *, beta: float) -> Tensor:
    """TDPO1: −log σ(β[Δ − (SeqKL(y⁻) − SeqKL(y⁺))]), one loss per pair."""
    delta = _masked_sum(chosen.logratio, chosen.valid) - _masked_sum(rejected.logratio, rejected.valid)
    kl_gap = _masked_sum(rejected.kl, rejected.valid) - _masked_sum(chosen.kl, chosen.valid)
    return -F.logsigmoid(beta * (delta - kl_gap))


@register("tdpo2", level="token", paper="Zeng et al. 2024, Token-level Direct Preference Optimization, arXiv:2404.11999")
def tdpo2_losses(chosen: TokenTerms, rejected: TokenTerms, *, beta: float, alpha: float = 0.5) -> Tensor:
    """TDPO2: −log σ(β[Δ − α(SeqKL(y⁻) − sg(SeqKL(y⁺)))]), sg = stop-gradient."""
    delta = _masked_sum(chosen.logratio, chosen.valid) - _masked_sum(rejected.logratio, rejected.valid)
    kl_gap = _masked_sum(rejected.kl, rejected.valid) - _masked_sum(chosen.kl, chosen.valid).detach()
    return -F.logsigmoid(beta * (delta - alpha * kl_gap))


@register("sparsepo", level="token",
          paper="Christopoulou et al. 2024, SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks, "
                "arXiv:2410.05102")
def sparsepo_losses(chosen: TokenTerms, rejected: TokenTerms, *, reward_masks: tuple[Tensor, Tensor],
                    kl_masks: tuple[Tensor, Tensor], beta: float, l1_reward: float = 0.0, l1_kl: float = 0.0,
                    shared_mask: bool = False) -> Tensor:
    """SparsePO: −log σ(β(u − δ)) + L1 penalties on the masks, one loss per pair.

    u = Σ m_u ρ(y⁺) − Σ m_u ρ(y⁻);  δ = Σ m_d KL(y⁻) − Σ m_d KL(y⁺), sums over reply
    tokens. ``reward_masks`` and ``kl_masks`` are (chosen, rejected) ``[B, T]`` tensors
    of non-negative weights. With one shared mask (``shared_mask``) each λ is halved,
    so the one mask is not penalised twice. All-ones masks and λ = 0 give TDPO1 exactly.
    """
    reward_chosen, reward_rejected = reward_masks
    kl_chosen, kl_rejected = kl_masks
    u = _masked_sum(chosen.logratio, chosen.valid, reward_chosen) - _masked_sum(
        rejected.logratio, rejected.valid, reward_rejected
    )
    delta = _masked_sum(rejected.kl, rejected.valid, kl_rejected) - _masked_sum(chosen.kl, chosen.valid, kl_chosen)
    losses = -F.logsigmoid(beta * (u - delta))
    scale = 0.5 if shared_mask else 1.0
    if l1_reward:
        l1 = _masked_sum(reward_chosen.abs(), chosen.valid) + _masked_sum(reward_rejected.abs(), rejected.valid)
        losses = losses + scale * l1_reward * l1
    if l1_kl:
        l1 = _masked_sum(kl_chosen.abs(), chosen.valid) + _masked_sum(kl_rejected.abs(), rejected.valid)
        losses = losses + scale * l1_kl * l1
    return losses


SEQUENCE_LOSSES = losses_of("sequence")
TOKEN_LOSSES = losses_of("token")
LOSSES = SEQUENCE_LOSSES + TOKEN_LOSSES
