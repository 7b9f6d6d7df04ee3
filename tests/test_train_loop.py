"""The training loop on a tiny random llama: step-0 identities, weights, masks, checkpoints, resume, NaN stop."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curate.data.schema import pairs_frame
from curate.errors import CurateError
from curate.train import train
from curate.train.data import auto_epsilon, column_values, epsilon_from_pairs

REPO = Path(__file__).resolve().parents[1]

FAST = dict(lr=1e-3, batch_size=4, bf16=False, save_every=0, progress=False)


def make_pairs(n: int = 8) -> pl.DataFrame:
    rows = [
        {"prompt": [{"role": "user", "content": f"question {i}: what is {i} plus {i}?"}],
         "chosen": f"It is {2 * i}." + " ok" * (i % 3), "rejected": "I don't know" + "!" * (i % 5)}
        for i in range(n)
    ]
    return pairs_frame(rows)


@pytest.fixture
def lm(tiny_lm):
    """A fresh copy of the session's tiny model (training changes weights in place)."""
    fresh = copy.copy(tiny_lm)
    fresh.model = copy.deepcopy(tiny_lm.model)
    return fresh


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["dpo", "tdpo1"])
def test_step0_policy_equals_reference(tmp_path, lm, loss):
    res = train(make_pairs(), out=tmp_path, model=lm, loss=loss, max_steps=1, **FAST)
    assert res.info["step0_max_abs_logratio"] < 1e-4
    first = read_metrics(tmp_path)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_final_dir_loads_with_from_pretrained(tmp_path, lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = train(make_pairs(), out=tmp_path, model=lm, max_steps=2, **FAST)
    loaded = AutoModelForCausalLM.from_pretrained(res.final_dir)
    AutoTokenizer.from_pretrained(res.final_dir)
    for (name, p), q in zip(lm.model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    assert {"loss", "reward_accuracy", "margin", "chosen_logps", "rejected_logps", "lr", "pairs_per_s"} <= set(metrics[0])
    manifest = json.loads((tmp_path / "manifest.json").read_text())["train"]
    assert manifest["pairs"] == 8 and manifest["steps"] == 2


def test_zero_weights_leave_the_policy_unchanged(tmp_path, lm):
    before = copy.deepcopy(lm.model.state_dict())
    pairs = make_pairs().with_columns(w=pl.lit(0.0))
    train(pairs, out=tmp_path, model=lm, weights="w", max_steps=2, **FAST)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sparsepo_learned_masks_train_and_are_saved(tmp_path, lm):
    res = train(make_pairs(), out=tmp_path, model=lm, loss="sparsepo", mask="learned", mask_mode="independent",
                mask_l1=1e-3, max_steps=2, **FAST)
    from safetensors.torch import load_file

    saved = load_file(str(res.final_dir / "sparsepo_masks.safetensors"))
    assert any(k.startswith("kl.") for k in saved) and any(k.startswith("reward.") for k in saved)
    last = read_metrics(tmp_path)[-1]
    assert 0.0 <= last["mask_sparsity"] <= 1.0 and math.isfinite(last["loss"])


def test_mask_network_receives_gradient_directly(lm):
    """One sparsepo micro-step: gradient reaches the masks, none reaches the reference."""
    from curate.data.chat import ChatEncoder
    from curate.train.batching import collate, encode_pairs
    from curate.train.batching import PolicyForward
    from curate.train.loop import TrainConfig, _compute_micro_loss, _Reference
    from curate.train.masks import SparsePOMasks

    policy = lm.model.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    # make the policy differ from the reference so the loss has a gradient w.r.t. the masks
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    cfg = lm.model.config
    masks = SparsePOMasks(cfg.num_hidden_layers, cfg.hidden_size, mode="independent")
    enc = encode_pairs(make_pairs(4), ChatEncoder(lm.tokenizer))
    batch = collate(enc.pairs, lm.tokenizer.pad_token_id)
    import contextlib

    loss, _ = _compute_micro_loss(PolicyForward(policy), policy, _Reference(model=reference), masks, batch, np.arange(4),
                                  cfg=TrainConfig(loss="sparsepo", mask_l1=1e-3), epsilon=0.0, weights=None,
                                  confidence=None, autocast=contextlib.nullcontext)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in masks.reward.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in masks.kl.parameters())
    assert all(p.grad is None for p in reference.parameters())


def test_lora_and_gradient_checkpointing(tmp_path, lm):
    from transformers import AutoModelForCausalLM

    before = copy.deepcopy(lm.model.state_dict())
    res = train(make_pairs(), out=tmp_path, model=lm, loss="tdpo2", lora_r=4, gradient_checkpointing=True,
                max_steps=2, **FAST)
    loaded = AutoModelForCausalLM.from_pretrained(res.final_dir)
    diffs = [not torch.equal(before[k], v) for k, v in loaded.state_dict().items() if k in before]
    assert any(diffs)  # the merged adapter changed some weights
    assert math.isfinite(res.final_loss)


def test_nan_stops_with_last_good_checkpoint(tmp_path, lm, monkeypatch):
    from curate.train import loop

    original = loop.pair_losses

    def poisoned(*args, **kwargs):  # NaN from the first step after the step-2 checkpoint
        out = original(*args, **kwargs)
        return out * float("nan") if (tmp_path / "checkpoints" / "step-000002").exists() else out

    monkeypatch.setattr(loop, "pair_losses", poisoned)
    with pytest.raises(CurateError, match="step 3.*step-000002"):
        train(make_pairs(16), out=tmp_path, model=lm, max_steps=4, **{**FAST, "save_every": 2})
    assert (tmp_path / "checkpoints" / "step-000002" / "model.safetensors").exists()
    assert not (tmp_path / "final").exists()


def test_bad_input_errors(tmp_path, lm):
    with pytest.raises(CurateError, match="no pairs"):
        train(make_pairs().head(0), out=tmp_path, model=lm, **FAST)
    with pytest.raises(CurateError, match="fewer than --batch-size"):
        train(make_pairs(3), out=tmp_path, model=lm, **FAST)
    with pytest.raises(CurateError, match="--soft-labels"):
        train(make_pairs(), out=tmp_path, model=lm, loss="ipo", soft_labels="c", **FAST)
    with pytest.raises(CurateError, match="not in the data"):
        train(make_pairs(), out=tmp_path, model=lm, weights="nope", **FAST)


def test_too_long_replies_are_left_out_and_counted(tmp_path, lm):
    rows = make_pairs(8).to_dicts()
    rows[0]["chosen"] = "word " * 200
    res = train(pairs_frame(rows), out=tmp_path, model=lm, max_length=64, max_steps=1, **FAST)
    assert res.info["left_out_reply_too_long"] == 1 and res.info["pairs"] == 7


def test_auto_epsilon():
    fp = np.array([0.1, 0.2, 0.9, 0.3])
    assert auto_epsilon(fp, np.array([False, False, True, False])) == pytest.approx((0.1 + 0.2 + 0.1 + 0.3) / 4)
    with pytest.raises(CurateError, match=">= 0.5"):
        auto_epsilon(np.array([0.6, 0.5]), np.zeros(2, bool))
    pairs = make_pairs(2).with_columns(flip_prob=pl.Series([0.2, 0.9]), flipped=pl.Series([False, True]))
    assert epsilon_from_pairs(pairs) == pytest.approx(0.15)  # an earlier run's table: flip_prob only
    # a current run has both; --epsilon auto acts on the conservative posterior, not the calibrated one
    both = pairs.with_columns(flip_prob_conservative=pl.Series([0.0, 1.0]))
    assert epsilon_from_pairs(both) == pytest.approx(0.0)
    with pytest.raises(CurateError, match="flip_prob"):
        epsilon_from_pairs(make_pairs(2))
    with pytest.raises(CurateError, match="probabilities"):
        column_values(make_pairs(2).with_columns(c=pl.lit(1.5)), "c", "soft-labels")


_RUN = """
import sys, polars as pl
sys.path.insert(0, {repo!r})
from tests.test_train_loop import make_pairs, FAST
from curate.models import tiny_causal_lm
from curate.train import train
train(make_pairs(16), out={out!r}, model=tiny_causal_lm(0), max_steps=24, resume={resume}, **{{**FAST, "save_every": 4}})
"""


def _run(out: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CURATE_QUIET": "1"}
    return subprocess.Popen([sys.executable, "-c", _RUN.format(repo=str(REPO), out=str(out), resume=resume)],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _metric_lines(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _kill_after(process: subprocess.Popen, out: Path, steps: int) -> None:
    """SIGKILL ``process`` as soon as it has logged ``steps`` steps (mid-step or mid-checkpoint, by chance)."""
    deadline = time.time() + 300
    while _metric_lines(out) < steps:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_resume_after_sigkills_matches_uninterrupted_run(tmp_path, tiny_lm):
    """Killed twice at seeded points (then resumed each time): same metrics and final weights as one clean run."""
    import random

    from safetensors.torch import load_file

    full, killed = tmp_path / "full", tmp_path / "killed"
    first = random.Random(13).randint(2, 9)  # before, at or after the first checkpoint (step 4)
    second = first + random.Random(14).randint(4, 10)
    _kill_after(_run(killed, resume=False), killed, first)
    _kill_after(_run(killed, resume=True), killed, second)
    assert not (killed / "final").exists(), "the run finished before it could be killed"

    def fresh():  # the same weights as tiny_causal_lm(0) in the subprocess
        model = copy.copy(tiny_lm)
        model.model = copy.deepcopy(tiny_lm.model)
        return model

    settings = {**FAST, "save_every": 4}
    train(make_pairs(16), out=killed, model=fresh(), max_steps=24, resume=True, **settings)
    train(make_pairs(16), out=full, model=fresh(), max_steps=24, **settings)
    a, b = read_metrics(full), read_metrics(killed)
    assert [m["step"] for m in b] == list(range(1, 25))
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-6)
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (full, killed))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert json.loads((killed / "manifest.json").read_text())["train"]["resumed_from"] is not None
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]  # no half checkpoint left


def test_resume_refuses_changed_settings(tmp_path, lm):
    train(make_pairs(), out=tmp_path, model=lm, max_steps=2, **{**FAST, "save_every": 1})
    with pytest.raises(CurateError, match="beta"):
        train(make_pairs(), out=tmp_path, model=lm, max_steps=2, resume=True, beta=0.5, **{**FAST, "save_every": 1})


def test_reference_logps_reused_from_scores_when_they_match(tmp_path, lm, tiny_lm):
    from curate.rundir import RunDir

    pairs = make_pairs(8)
    first = train(pairs, out=tmp_path / "a", model=lm, max_steps=1, **FAST)
    ref = torch.load(tmp_path / "a" / "reference_logps.pt").double().numpy()
    # pair 0 was flipped by curation: scores stay in the original orientation
    run = RunDir(tmp_path / "run")
    run.write_pairs(pairs.with_columns(flipped=pl.int_range(pl.len()) == 0), pl.DataFrame())
    chosen, rejected = ref[:, 0].copy(), ref[:, 1].copy()
    chosen[0], rejected[0] = ref[0, 1], ref[0, 0]
    run.merge_scores(pl.DataFrame({"pair_id": pairs["pair_id"], "logp_chosen": chosen, "logp_rejected": rejected}))
    from curate.rundir import ScoreSection, Truncation

    run.write_section(ScoreSection(model={"name": first.info["model"]["name"]}, truncation=Truncation(max_length=1024)))

    def fresh():
        model = copy.copy(tiny_lm)
        model.model = copy.deepcopy(tiny_lm.model)
        return model

    reused = train(run.path, out=tmp_path / "b", model=fresh(), max_steps=1, **FAST)
    assert reused.info["reference"].startswith("reused from the scoring run")
    assert torch.allclose(torch.load(tmp_path / "b" / "reference_logps.pt"), torch.from_numpy(ref).float())
    assert reused.info["step0_max_abs_logratio"] < 1e-3

    run.merge_scores(pl.DataFrame({"pair_id": pairs["pair_id"], "logp_chosen": chosen + 5, "logp_rejected": rejected}))
    recomputed = train(run.path, out=tmp_path / "c", model=fresh(), max_steps=1, **FAST)
    assert "differ" in recomputed.info["reference"]


def test_lr_schedule_and_data_order():
    from curate.train.loop import epoch_order, lr_factor

    assert [lr_factor(s, warmup=3, total=13) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_factor(3, warmup=3, total=13) == pytest.approx(1.0)
    assert lr_factor(8, warmup=3, total=13) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_factor(12, warmup=3, total=13) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert np.array_equal(epoch_order(10, 0, 1), epoch_order(10, 0, 1))
    assert not np.array_equal(epoch_order(10, 0, 0), epoch_order(10, 0, 1))
