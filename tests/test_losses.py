"""Losses pinned to hand-computed values, TRL parity, and the SparsePO ↔ TDPO1 identity."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from curate.train.losses import (
    TokenTerms,
    pair_losses,
    sft_loss,
    sparsepo_losses,
    tdpo1_losses,
    tdpo2_losses,
    token_kl,
    weighted_mean,
)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# r+ = 2, r- = -3, beta = 0.1  ->  beta*Delta = 0.5
R_PLUS, R_MINUS, BETA = torch.tensor([2.0]), torch.tensor([-3.0]), 0.1


@pytest.mark.parametrize(
    "kind, epsilon, expected",
    [
        ("dpo", 0.0, -math.log(_sig(0.5))),
        ("cdpo", 0.2, -0.8 * math.log(_sig(0.5)) - 0.2 * math.log(_sig(-0.5))),
        ("rdpo", 0.2, (-0.8 * math.log(_sig(0.5)) + 0.2 * math.log(_sig(-0.5))) / 0.6),
        ("hinge", 0.0, 0.5),
    ],
)
def test_sequence_losses_hand_values(kind, epsilon, expected):
    out = pair_losses(kind, R_PLUS, R_MINUS, beta=BETA, epsilon=epsilon)
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_ipo_averages_per_token():
    out = pair_losses("ipo", R_PLUS, R_MINUS, beta=BETA, chosen_len=torch.tensor([4]), rejected_len=torch.tensor([3]))
    assert out.item() == pytest.approx((2 / 4 + 3 / 3 - 1 / 0.2) ** 2, abs=1e-5)


def test_dpo_at_policy_equals_reference_is_log2():
    zero = torch.zeros(3)
    assert torch.allclose(pair_losses("dpo", zero, zero, beta=0.1), torch.full((3,), math.log(2)))


def test_soft_labels_below_half_reverse_the_pair():
    conf = torch.tensor([1.0, 0.5, 0.0, 0.8])
    r_plus, r_minus = torch.full((4,), 2.0), torch.full((4,), -3.0)
    out = pair_losses("dpo", r_plus, r_minus, beta=BETA, label_confidence=conf)
    assert out[0].item() == pytest.approx(-math.log(_sig(0.5)), abs=1e-6)
    assert out[1].item() == pytest.approx(-0.5 * math.log(_sig(0.5)) - 0.5 * math.log(_sig(-0.5)), abs=1e-6)
    assert out[2].item() == pytest.approx(-math.log(_sig(-0.5)), abs=1e-6)  # label reversed
    # c = 0.8 equals per-pair cDPO with epsilon = 0.2
    assert out[3].item() == pytest.approx(pair_losses("cdpo", R_PLUS, R_MINUS, beta=BETA, epsilon=0.2).item(), abs=1e-6)


def test_bad_epsilon_and_kind_raise():
    with pytest.raises(ValueError):
        pair_losses("rdpo", R_PLUS, R_MINUS, beta=BETA, epsilon=0.5)
    with pytest.raises(ValueError):
        pair_losses("nope", R_PLUS, R_MINUS, beta=BETA)
    with pytest.raises(ValueError):
        pair_losses("ipo", R_PLUS, R_MINUS, beta=BETA)


def test_weighted_mean_and_sft():
    losses = torch.tensor([1.0, 3.0])
    assert weighted_mean(losses).item() == 2.0
    assert weighted_mean(losses, torch.tensor([0.5, 0.0])).item() == 0.25
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    valid = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sft_loss(logps, valid).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3 tokens


# ------------------------------------------------------------------ token level
def _terms(seed: int, lengths: list[int], T: int = 5) -> TokenTerms:
    g = torch.Generator().manual_seed(seed)
    valid = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    return TokenTerms(
        logratio=torch.randn(len(lengths), T, generator=g) * valid,
        kl=torch.rand(len(lengths), T, generator=g) * valid,
        valid=valid,
    )


def test_tdpo_hand_values():
    chosen = TokenTerms(torch.tensor([[1.0, 0.5]]), torch.tensor([[0.2, 0.1]]), torch.tensor([[1.0, 1.0]]))
    rejected = TokenTerms(torch.tensor([[-1.0, 7.0]]), torch.tensor([[0.4, 5.0]]), torch.tensor([[1.0, 0.0]]))
    # Delta = 1.5 - (-1) = 2.5; SeqKL(y-) - SeqKL(y+) = 0.4 - 0.3 = 0.1
    assert tdpo1_losses(chosen, rejected, beta=0.5).item() == pytest.approx(-math.log(_sig(0.5 * 2.4)), abs=1e-6)
    assert tdpo2_losses(chosen, rejected, beta=0.5).item() == pytest.approx(-math.log(_sig(0.5 * 2.45)), abs=1e-6)


def test_sparsepo_all_ones_masks_equal_tdpo1_exactly():
    chosen, rejected = _terms(0, [5, 1, 3]), _terms(1, [2, 4, 1])
    ones = torch.ones_like(chosen.valid)
    sparse = sparsepo_losses(chosen, rejected, reward_masks=(ones, ones), kl_masks=(ones, ones), beta=0.3)
    assert torch.equal(sparse, tdpo1_losses(chosen, rejected, beta=0.3))


def test_sparsepo_masks_and_l1():
    chosen = TokenTerms(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]]), torch.ones(1, 2))
    rejected = TokenTerms(torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 0.0]]))
    m_c, m_r = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.5, 9.0]])  # 9.0 sits on padding: ignored
    out = sparsepo_losses(chosen, rejected, reward_masks=(m_c, m_r), kl_masks=(m_c, m_r), beta=1.0,
                          l1_reward=0.1, l1_kl=0.01)
    u = 2 * 2.0 - 0.5 * (-1.0)  # 4.5
    delta = 0.5 * 1.0 - (0 * 0.5 + 2 * 0.5)  # -0.5
    l1 = 2.0 + 0.5
    assert out.item() == pytest.approx(-math.log(_sig(u - delta)) + 0.1 * l1 + 0.01 * l1, abs=1e-6)
    shared = sparsepo_losses(chosen, rejected, reward_masks=(m_c, m_r), kl_masks=(m_c, m_r), beta=1.0,
                             l1_reward=0.1, l1_kl=0.01, shared_mask=True)
    assert shared.item() == pytest.approx(-math.log(_sig(u - delta)) + 0.5 * 0.11 * l1, abs=1e-6)


def test_one_token_replies_are_finite():
    chosen, rejected = _terms(2, [1, 1]), _terms(3, [1, 1])
    ones = torch.ones_like(chosen.valid)
    for out in (
        tdpo1_losses(chosen, rejected, beta=0.1),
        tdpo2_losses(chosen, rejected, beta=0.1),
        sparsepo_losses(chosen, rejected, reward_masks=(ones, ones), kl_masks=(ones, ones), beta=0.1, l1_reward=1e-3),
    ):
        assert torch.isfinite(out).all()


def test_token_kl_matches_definition_and_is_zero_for_equal_logits():
    g = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    p_ref, p = ref.softmax(-1), policy.softmax(-1)
    expected = (p_ref * (p_ref.log() - p.log())).sum(-1)
    assert torch.allclose(token_kl(policy, ref), expected, atol=1e-6)
    assert torch.allclose(token_kl(ref, ref), torch.zeros(2, 3), atol=1e-6)
    # extreme logits: softmax().log() would give -inf * 0 = NaN; log_softmax stays finite
    extreme = torch.tensor([[0.0, -1e4, 1e4]])
    assert torch.isfinite(token_kl(extreme, extreme.flip(-1))).all()


# ------------------------------------------------------------------ TRL parity
def _trl_losses(loss_type: str, policy_tok: torch.Tensor, ref_chosen, ref_rejected, mask, beta, label_smoothing=0.0):
    """Run TRL's own DPOTrainer._compute_loss on given per-token log-probs, one pair at a time."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

    class FakeModel:
        training = True

        def __call__(self, **kwargs):
            return SimpleNamespace(
                log_probs=self.log_probs, entropy=torch.zeros_like(self.log_probs),
                mean_logits=torch.zeros_like(self.log_probs), is_top1=torch.zeros_like(self.log_probs, dtype=torch.bool),
            )

    fake_model = FakeModel()
    accel = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    from collections import defaultdict

    stub = SimpleNamespace(
        model=fake_model, accelerator=accel, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    out = []
    n, T = ref_chosen.shape[0], mask.shape[-1]
    for i in range(n):
        # batch is [chosen, rejected]; log_probs are over shifted positions (T - 1)
        completion = torch.stack([mask[0, i], mask[1, i]])
        fake_model.log_probs = torch.stack([policy_tok[0, i], policy_tok[1, i]])[:, 1:] * completion[:, 1:]
        inputs = {
            "input_ids": torch.zeros(2, T, dtype=torch.long), "attention_mask": torch.ones(2, T, dtype=torch.long),
            "completion_mask": completion.long(),
            "ref_chosen_logps": ref_chosen[i:i + 1], "ref_rejected_logps": ref_rejected[i:i + 1],
        }
        out.append(trl_dpo.DPOTrainer._compute_loss(stub, fake_model, inputs, False))
    return torch.stack(out)


@pytest.mark.parametrize("loss_type, kind, eps", [("sigmoid", "dpo", 0.0), ("ipo", "ipo", 0.0),
                                                  ("robust", "rdpo", 0.2), ("hinge", "hinge", 0.0)])
def test_trl_parity(loss_type, kind, eps):
    g = torch.Generator().manual_seed(0)
    n, T, beta = 6, 9, 0.1
    lengths = torch.randint(1, T - 2, (2, n), generator=g)
    # completion tokens sit at the end of the sequence; position 0 is always prompt
    mask = (torch.arange(T)[None, None, :] >= T - lengths[..., None]).float()
    policy_tok = -torch.rand(2, n, T, generator=g) * 3 * mask
    ref_c, ref_r = (-torch.rand(n, generator=g) * 10), (-torch.rand(n, generator=g) * 10)
    trl = _trl_losses(loss_type, policy_tok, ref_c, ref_r, mask, beta, label_smoothing=eps)
    policy_c, policy_r = policy_tok[0].sum(-1), policy_tok[1].sum(-1)
    ours = pair_losses(kind, policy_c - ref_c, policy_r - ref_r, beta=beta, epsilon=eps,
                       chosen_len=lengths[0], rejected_len=lengths[1])
    assert torch.allclose(ours, trl, atol=1e-5, rtol=0)


def test_cdpo_matches_trl_028_sigmoid_with_label_smoothing():
    # TRL <= 0.28, DPOTrainer.dpo_loss, loss_type="sigmoid" (TRL 1.x ignores label_smoothing there):
    #   losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    g = torch.Generator().manual_seed(1)
    r_c, r_r = torch.randn(8, generator=g) * 5, torch.randn(8, generator=g) * 5
    beta, ls = 0.2, 0.15
    logits = r_c - r_r
    trl_028 = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    assert torch.allclose(pair_losses("cdpo", r_c, r_r, beta=beta, epsilon=ls), trl_028, atol=1e-6)
