"""SparsePO learned masks: their statistics at initialisation, per init, against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curate.errors import CurateError
from curate.train.loop import TrainConfig
from curate.train.masks import LearnedMask, SparsePOMasks, mask_mean, zero_fraction

L, D = 30, 576  # SmolLM2-135M's layers and width


def hidden_states(seed: int, n: int = 8, r: int = 64) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, r, D, generator=g)  # correlated across layers, like a residual stream
    hidden = [base + 0.5 * torch.randn(n, r, D, generator=g) + 3.0 for _ in range(L)]
    return hidden, torch.ones(n, r)


def expected_relu(mu: float, sigma: float) -> float:
    """E[ReLU(X)], X ~ N(mu, sigma²)."""
    a = mu / sigma
    return mu * 0.5 * (1 + math.erf(a / math.sqrt(2))) + sigma * math.exp(-a * a / 2) / math.sqrt(2 * math.pi)


def test_mask_mean_and_zero_fraction_by_hand():
    mask = torch.tensor([[0.5, 2.0, 9.0], [0.0, 1.0, 0.0]])
    valid = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert mask_mean(mask, valid) == pytest.approx((0.5 + 2.0 + 0.0 + 1.0 + 0.0) / 5)
    assert zero_fraction(mask, valid) == pytest.approx(2 / 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_init_starts_near_one_without_zeros(seed):
    """Each unit is ReLU(1 + w·LN(h)) with w ~ N(0, 0.25/d) and ‖LN(h)‖² = d, so w·LN(h) ~ N(0, 0.5²):
    per unit E = E[ReLU(N(1, 0.5²))] = 1.0043, and the mixer averages 30 of them."""
    torch.manual_seed(seed)
    net = LearnedMask(L, D)
    assert all(float(lin.bias.detach()) == 1.0 for lin in net.per_layer)
    assert torch.equal(net.mixer.weight, torch.full((1, L), 1 / L))
    hidden, valid = hidden_states(seed)
    with torch.no_grad():
        m = net(hidden)
    assert mask_mean(m, valid) == pytest.approx(expected_relu(1.0, 0.5), abs=0.05)
    assert zero_fraction(m, valid) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_init_reproduces_the_old_mask_exactly(seed):
    """init="torch" is curate's mask before the unit init: the same modules drawn in the same order."""
    torch.manual_seed(seed)
    old_norm = nn.LayerNorm(D, eps=1e-5)
    old_layers = nn.ModuleList(nn.Linear(D, 1) for _ in range(L))
    old_mixer = nn.Linear(L, 1, bias=False)
    torch.manual_seed(seed)
    net = LearnedMask(L, D, init="torch")
    for old, new in zip(old_layers, net.per_layer):
        assert torch.equal(old.weight, new.weight) and torch.equal(old.bias, new.bias)
    assert torch.equal(old_mixer.weight, net.mixer.weight)
    hidden, _ = hidden_states(seed)
    with torch.no_grad():
        old = torch.relu(old_mixer(torch.cat([torch.relu(lin(old_norm(h))) for lin, h in zip(old_layers, hidden)], -1)))
        assert torch.equal(net(hidden), old.squeeze(-1))


def test_reference_init_is_hf_normal_with_zero_bias():
    torch.manual_seed(0)
    net = LearnedMask(L, D, init="reference", init_std=0.02)
    weights = torch.cat([lin.weight.flatten() for lin in net.per_layer])
    assert float(weights.std()) == pytest.approx(0.02, rel=0.05)
    assert all(float(lin.bias.detach()) == 0.0 for lin in net.per_layer)
    assert float(net.mixer.weight.std()) == pytest.approx(0.02, rel=0.5)
    # its start: each unit ReLU(N(0, (0.02·√d)²)), mixed by N(0, 0.02²) weights -> a mask far below 1
    hidden, valid = hidden_states(0)
    with torch.no_grad():
        m = net(hidden)
    assert mask_mean(m, valid) < 0.1


def test_independent_masks_share_the_init_and_bad_inits_fail():
    torch.manual_seed(0)
    both = SparsePOMasks(L, D, mode="independent", init="unit")
    assert torch.equal(both.reward.mixer.weight, both.kl.mixer.weight)
    assert not torch.equal(both.reward.per_layer[0].weight, both.kl.per_layer[0].weight)
    with pytest.raises(ValueError, match="mask init"):
        LearnedMask(L, D, init="zeros")
    with pytest.raises(CurateError, match="--mask-init"):
        TrainConfig(loss="sparsepo", mask_init="zeros").validate()
