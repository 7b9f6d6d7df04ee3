"""Training reads the reference log-probs `curate score` wrote, through the typed score manifest."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from curate.models import tiny_causal_lm
from curate.rundir import RunDir, ScoreSection
from curate.score import score
from curate.train import train

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _copy(lm):
    out = copy.copy(lm)
    out.model = copy.deepcopy(lm.model)
    return out


def test_train_reuses_the_reference_logps_curate_score_wrote(tmp_path, hh_path):
    lm = tiny_causal_lm(seed=0)
    run = tmp_path / "run"
    score(hh_path, out=run, lm=_copy(lm), scores="logps", limit=8)
    assert RunDir(run).section(ScoreSection).truncation.max_length == 2048
    result = train(run, out=tmp_path / "train", model=_copy(lm), max_steps=1, batch_size=4, bf16=False,
                   save_every=0, progress=False)
    assert result.info["reference"].startswith("reused from the scoring run"), result.info["reference"]
    assert result.info["step0_max_abs_logratio"] <= 1e-3


@pytest.mark.parametrize("loss, prefix_sharing", [("dpo", True), ("ipo", True), ("dpo", False)])
def test_under_bf16_training_reuses_a_bf16_mixed_scoring_run(tmp_path, hh_path, loss, prefix_sharing):
    # scored in other batches than training's (engine token budget vs 2-pair micro-batches of HH
    # prompts of many lengths); bucketed widths make each pair's bf16 arithmetic its own, and
    # training follows the scoring run's layout (full sequences: a GPU's default)
    lm = tiny_causal_lm(seed=0)
    run = tmp_path / "run"
    score(hh_path, out=run, lm=dataclasses.replace(_copy(lm), autocast=torch.bfloat16), scores="logps", limit=12,
          prefix_sharing=prefix_sharing)
    assert RunDir(run).section(ScoreSection).dtype == "bf16-mixed"
    result = train(run, out=tmp_path / "train", model=_copy(lm), loss=loss, max_steps=1, batch_size=4,
                   grad_accum=2, bf16=True, save_every=0, progress=False)
    assert result.info["reference"].startswith("reused from the scoring run"), result.info["reference"]
    assert result.info["step0_max_abs_logratio"] <= 1e-3
    assert result.info["shared_prompt_forward"] is prefix_sharing


def test_under_bf16_an_fp32_scoring_run_is_recomputed_and_said(tmp_path, hh_path):
    lm = tiny_causal_lm(seed=0)
    run = tmp_path / "run"
    score(hh_path, out=run, lm=_copy(lm), scores="logps", limit=12)
    result = train(run, out=tmp_path / "train", model=_copy(lm), max_steps=1, batch_size=4, grad_accum=2, bf16=True,
                   save_every=0, progress=False)
    assert result.info["step0_max_abs_logratio"] <= 1e-3, result.info["reference"]
    # fp32 arithmetic vs bf16 autocast differ by ~4e-3 nats on this model: more than the tolerance
    assert result.info["reference"].startswith(
        "computed before training (scored in float32, training computes in bf16-mixed; "), result.info["reference"]
