"""`optimizer` in the training config: RMSProp's first step is 10x AdamW's per weight, as their formulas say."""

from __future__ import annotations

import copy

import pytest
import torch

from curate.errors import CurateError
from curate.train import train
from curate.train.loop import TrainConfig
from tests.test_train_loop import make_pairs


@pytest.mark.parametrize("optimizer, factor", [("adamw", 1.0), ("rmsprop", 10.0)])
def test_first_step_size(tmp_path, tiny_lm, optimizer, factor):
    """Step 1 from zero state: AdamW moves each weight by lr·sign(g); RMSProp (alpha 0.99) by
    lr·g/√(0.01·g²) = 10·lr·sign(g)."""
    lm = copy.copy(tiny_lm)
    lm.model = copy.deepcopy(tiny_lm.model)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    lr = 1e-4
    train(make_pairs(), out=tmp_path, model=lm, loss="dpo", optimizer=optimizer, lr=lr, max_steps=1,
          warmup_ratio=0.0, max_grad_norm=0.0, batch_size=4, bf16=False, save_every=0, progress=False)
    moved = torch.cat([(lm.model.state_dict()[k] - v).abs().flatten() for k, v in before.items()])
    assert float(moved.max()) == pytest.approx(factor * lr, rel=1e-2)


def test_unknown_optimizer_is_refused():
    with pytest.raises(CurateError, match="--optimizer"):
        TrainConfig(optimizer="sgd").validate()
