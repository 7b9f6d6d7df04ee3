"""The loss registry: every loss registered once with its paper; a new one is one decorated function."""

from __future__ import annotations

import math

import pytest
import torch

from curate.train import losses as L


def test_every_loss_is_registered_with_its_level_and_paper():
    assert set(L.SEQUENCE_LOSSES) == {"dpo", "ipo", "cdpo", "rdpo", "hinge"}
    assert set(L.TOKEN_LOSSES) == {"tdpo1", "tdpo2", "sparsepo"}
    assert all("arXiv" in L.REGISTRY[n].paper or "Mitchell" in L.REGISTRY[n].paper for n in L.LOSSES)
    assert L.REGISTRY["tdpo1"].fn is L.tdpo1_losses and L.REGISTRY["sparsepo"].fn is L.sparsepo_losses


def test_pair_losses_dispatch_through_the_registry_to_hand_values():
    r_plus, r_minus = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    delta = torch.tensor([1.0, -1.0])
    dpo = L.pair_losses("dpo", r_plus, r_minus, beta=0.5)
    assert dpo.tolist() == pytest.approx([math.log1p(math.exp(-0.5 * d)) for d in delta.tolist()])
    hinge = L.pair_losses("hinge", r_plus, r_minus, beta=2.0)
    assert hinge.tolist() == pytest.approx([0.0, 3.0])
    with pytest.raises(ValueError, match="unknown sequence loss 'tdpo1'"):
        L.pair_losses("tdpo1", r_plus, r_minus, beta=0.1)


def test_registering_a_loss_makes_it_available(monkeypatch):
    monkeypatch.setattr(L, "REGISTRY", dict(L.REGISTRY))

    @L.register("squared", level="sequence", paper="a test")
    def squared(chosen_logratio, rejected_logratio, *, beta, **_):
        return (beta * (chosen_logratio - rejected_logratio) - 1) ** 2

    out = L.pair_losses("squared", torch.tensor([2.0]), torch.tensor([0.0]), beta=1.0)
    assert out.tolist() == [1.0]
    assert "squared" in L.losses_of("sequence")
    with pytest.raises(ValueError, match="level"):
        L.register("bad", level="pair", paper="x")
