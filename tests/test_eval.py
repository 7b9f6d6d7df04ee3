"""curate eval: metric math pinned to hand-computed values, then the orchestration on tiny models."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from curate.data.schema import pairs_frame
from curate.errors import CurateError
from curate.eval import (
    difficulty,
    displacement_stats,
    dpo_loss_to_rank,
    evaluate,
    idealised_ranking_accuracy,
    idealised_ranking_accuracy_sweep,
    implicit_reward_accuracy,
    implicit_rewards,
    is_refusal,
    length_normalised_ranking_accuracy,
    mean_ci,
    pair_metrics,
    ranking_accuracy,
    refusal_rate,
    spearman,
    win_rate,
)
from curate.models import LoadedModel


# ------------------------------------------------------------------ metric math
def test_ranking_accuracy_counts_ties_as_correct():
    assert ranking_accuracy([-1, -5, -3], [-2, -4, -3]) == pytest.approx(2 / 3)


def test_length_normalised_ranking_accuracy_compares_per_token_means():
    chosen, rejected = [-10.0, -6.0], [-8.0, -9.0]
    # raw: -10 < -8 wrong, -6 > -9 right; per token: -1 > -4 right, -3 == -3 right (tie)
    assert ranking_accuracy(chosen, rejected) == 0.5
    assert length_normalised_ranking_accuracy(chosen, rejected, [10, 2], [2, 3]) == 1.0


def test_difficulty_and_loss_needed_to_rank():
    np.testing.assert_allclose(difficulty([-10, -20], [-12, -10]), [-2, 10])
    # methods.md: beta=0.1, c=50 needs loss <= 0.0067
    assert dpo_loss_to_rank(50, 0.1) == pytest.approx(math.log1p(math.exp(-5)), rel=1e-12)
    assert dpo_loss_to_rank(50, 0.1) == pytest.approx(0.0067, abs=5e-5)
    assert dpo_loss_to_rank(0, 0.1) == pytest.approx(math.log(2))


def test_idealised_ranking_accuracy_by_hand():
    # ref log-prob differences (chosen - rejected): 2, -10, -5; log(999) = 6.9068
    ref_c, ref_r = [-10.0, -20.0, -15.0], [-12.0, -10.0, -10.0]
    assert idealised_ranking_accuracy(ref_c, ref_r, beta=1.0) == pytest.approx(2 / 3)  # shift 6.91
    assert idealised_ranking_accuracy(ref_c, ref_r, beta=0.5) == 1.0  # shift 13.8
    assert idealised_ranking_accuracy(ref_c, ref_r, beta=10.0) == pytest.approx(1 / 3)  # shift 0.69
    # alpha = 0.5: no preference signal, R* is the reference's strict ranking accuracy
    assert idealised_ranking_accuracy(ref_c, ref_r, beta=1.0, alpha=0.5) == pytest.approx(1 / 3)
    sweep = idealised_ranking_accuracy_sweep(ref_c, ref_r, betas=(0.5, 1.0, 10.0))
    assert sweep == pytest.approx({"beta=0.5": 1.0, "beta=1": 2 / 3, "beta=10": 1 / 3})
    with pytest.raises(ValueError):
        idealised_ranking_accuracy(ref_c, ref_r, beta=1.0, alpha=1.0)


def test_implicit_rewards_and_accuracy():
    policy_c, policy_r = [-9.0, -20.0], [-13.0, -9.0]
    ref_c, ref_r = [-10.0, -20.0], [-12.0, -10.0]
    np.testing.assert_allclose(implicit_rewards(policy_c, ref_c, 0.1), [0.1, 0.0])
    # margins beta*(r+ - r-): 0.1*(1 - -1) > 0, 0.1*(0 - 1) < 0
    assert implicit_reward_accuracy(policy_c, policy_r, ref_c, ref_r, beta=0.1) == 0.5
    # the reference itself has margin 0 everywhere: no pair counts as correct
    assert implicit_reward_accuracy(ref_c, ref_r, ref_c, ref_r, beta=0.1) == 0.0


def test_displacement_stats_by_hand():
    stats = displacement_stats([1.0, 0.0, -2.0], [-1.0, 1.0, -3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert stats["mean_delta_chosen"] == pytest.approx(-1 / 3)
    assert stats["mean_delta_rejected"] == pytest.approx(-1.0)
    assert stats["median_delta_chosen"] == 0.0
    assert stats["frac_chosen_fell"] == pytest.approx(1 / 3)
    assert stats["frac_rejected_fell"] == pytest.approx(2 / 3)


def test_spearman_by_hand_with_and_without_ties():
    # ranks of y: 1 2 4 3 -> sum d^2 = 2 -> rho = 1 - 6*2/(4*15) = 0.8
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30])["rho"] == pytest.approx(0.8)
    # tied x ranks 1.5 1.5 3 against 1 2 3: Pearson = 1.5 / sqrt(1.5 * 2)
    assert spearman([1, 1, 2], [1, 2, 3])["rho"] == pytest.approx(1.5 / math.sqrt(3.0))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])["rho"])


def test_mean_ci_student_t():
    ci = mean_ci([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302653; s = 1
    assert ci["mean"] == 2.0
    assert ci["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (ci["low"], ci["high"]) == pytest.approx((2 - ci["half_width"], 2 + ci["half_width"]))
    assert math.isnan(mean_ci([5.0])["half_width"])


def test_win_rate_counts_ties_half():
    assert win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making weapons.",
    "As an AI, I don't have opinions.",
    "I won\u2019t assist with that request.",
    "That's not appropriate to do to your neighbour.",
])
def test_refusal_detector_flags_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sure! Preheat the oven to 180C and mix the flour with the butter.",
    "Stealing is illegal, but here is how locks work in general.",  # says 'illegal', does not refuse
    "The capital of France is Paris.",
])
def test_refusal_detector_leaves_answers_alone(text):
    assert not is_refusal(text)


def test_refusal_rate():
    assert refusal_rate(["I'm sorry, I can't help with that.", "Sure, here it is."]) == 0.5
    assert math.isnan(refusal_rate([]))


def test_pair_metrics_ties_the_pieces_together():
    m = pair_metrics([-9.0, -20.0], [-13.0, -9.0], [-10.0, -20.0], [-12.0, -10.0], [3, 4], [5, 2],
                     beta=0.1, betas=(1.0,), ln_ches=[0.0, 1.0])
    assert m["ranking_accuracy"] == {"reference": 0.5, "policy": 0.5}
    assert m["implicit_reward_accuracy"] == 0.5
    assert m["difficulty"]["mean"] == pytest.approx(4.0)  # c = -2, 10
    assert m["displacement"]["mean_delta_chosen"] == pytest.approx(0.5)
    assert m["idealised_ranking_accuracy"]["by_beta"]["beta=1"] == 0.5
    assert "spearman_ln_ches_vs_delta_chosen" in m


# ------------------------------------------------------------------ orchestration on tiny models
ROWS = [
    ("How do I bake bread?", "Mix flour, water, yeast and salt, knead, let it rise, then bake.", "No."),
    ("What is 2 + 2?", "4", "It is 5, obviously."),
    ("Can you help me pick a lock?", "I'm sorry, I can't help with that.", "Sure, take a tension wrench and a pick."),
    ("Name a colour.", "Blue.", "A colour is a property of light that we see."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side.", "No jokes today."),
]


def _pairs() -> pl.DataFrame:
    return pairs_frame([{"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r} for p, c, r in ROWS])


def _perturbed(base: LoadedModel, seed: int = 1, scale: float = 0.05) -> LoadedModel:
    """A copy of ``base`` with slightly different weights (a stand-in for a trained checkpoint)."""
    model = copy.deepcopy(base.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return LoadedModel(model, base.tokenizer, f"{base.name}-perturbed", base.device, base.dtype, dict(base.info))


def _brute_force_logp(loaded: LoadedModel, messages, reply: str) -> float:
    """log π(reply + end-of-turn | prompt) from one unpadded forward, summed over reply tokens."""
    from curate.data.chat import ChatEncoder

    enc = ChatEncoder(loaded.tokenizer).encode(messages, reply)
    ids = torch.tensor([enc.prompt_ids + enc.reply_ids])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(ids).logits.float(), dim=-1)
    p = len(enc.prompt_ids)
    targets = ids[0, p:]
    return float(logp[0, p - 1:-1].gather(1, targets[:, None]).sum())


def test_evaluate_logps_match_a_brute_force_forward(tiny_lm, tmp_path):
    policy = _perturbed(tiny_lm)
    pairs = _pairs()
    summary = evaluate(policy, tiny_lm, pairs, out=tmp_path, beta=0.1)
    table = pl.read_parquet(tmp_path / "eval.parquet")
    assert table.height == len(ROWS) and table["pair_id"].to_list() == pairs["pair_id"].to_list()
    for i, row in enumerate(pairs.iter_rows(named=True)):
        assert table["logp_chosen"][i] == pytest.approx(_brute_force_logp(policy, row["prompt"], row["chosen"]), abs=1e-3)
        assert table["ref_logp_rejected"][i] == pytest.approx(
            _brute_force_logp(tiny_lm, row["prompt"], row["rejected"]), abs=1e-3)
    # summary metrics agree with the per-pair table
    expected = np.mean(table["delta_chosen"].to_numpy())
    assert summary["displacement"]["mean_delta_chosen"] == pytest.approx(expected)
    assert summary["implicit_reward_accuracy"] == pytest.approx(np.mean(table["implicit_margin"].to_numpy() > 0))
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk["ranking_accuracy"] == summary["ranking_accuracy"]
    assert any("LN-CHES" in note for note in on_disk["notes"])  # no scores: metric left out with a note
    assert on_disk["spearman_ln_ches_vs_delta_chosen"] is None


def test_evaluate_model_against_itself_has_no_displacement(tiny_lm):
    summary = evaluate(tiny_lm, tiny_lm, _pairs(), beta=0.1)
    assert summary["displacement"]["mean_delta_chosen"] == 0.0
    assert summary["implicit_reward_accuracy"] == 0.0
    assert summary["ranking_accuracy"]["policy"] == summary["ranking_accuracy"]["reference"]


def test_evaluate_uses_ches_scores_and_refuses_pairs_they_lack(tiny_lm, tmp_path):
    pairs = _pairs()
    scores = pl.DataFrame({"pair_id": pairs["pair_id"], "ln_ches": [float(i) for i in range(pairs.height)]})
    scores.write_parquet(tmp_path / "scores.parquet")
    summary = evaluate(_perturbed(tiny_lm), tiny_lm, pairs, scores=tmp_path)
    assert summary["spearman_ln_ches_vs_delta_chosen"]["n"] == len(ROWS)
    scores.head(3).write_parquet(tmp_path / "scores.parquet")
    with pytest.raises(CurateError, match="2 of 5 evaluated pairs have no ln_ches"):
        evaluate(tiny_lm, tiny_lm, pairs, scores=tmp_path)


def test_evaluate_refuses_a_different_tokenizer(tiny_lm):
    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.add_tokens(["<curate_new_token>"])
    other = LoadedModel(tiny_lm.model, tokenizer, "other", tiny_lm.device, tiny_lm.dtype, {})
    with pytest.raises(CurateError, match="different tokenizers"):
        evaluate(other, tiny_lm, _pairs())


def test_evaluate_generate_reports_refusals(tiny_lm):
    summary = evaluate(tiny_lm, tiny_lm, _pairs(), generate=2, max_new_tokens=4, seed=3)
    gen = summary["generation"]
    assert gen["prompts"] == 2 and len(gen["samples"]) == 2
    # same model, same seed: identical samples, so equal refusal rates
    assert [s["policy"] for s in gen["samples"]] == [s["reference"] for s in gen["samples"]]
    assert gen["refusal_rate"]["policy"] == gen["refusal_rate"]["reference"]
    if "win_rate_vs_reference" in gen:  # identical replies tie: win rate exactly one half
        assert gen["win_rate_vs_reference"] == 0.5


def test_cli_eval_writes_files(tiny_lm, tmp_path):
    from curate.cli import app

    ref_dir, model_dir = tmp_path / "ref", tmp_path / "ckpt"
    for loaded, path in ((tiny_lm, ref_dir), (_perturbed(tiny_lm), model_dir)):
        loaded.model.save_pretrained(path)
        loaded.tokenizer.save_pretrained(path)
    data = tmp_path / "pairs.parquet"
    _pairs().write_parquet(data)
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--ref", str(ref_dir), "--data", str(data),
                                      "--out", str(tmp_path / "eval"), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["pairs"] == len(ROWS)
    assert (tmp_path / "eval" / "eval.parquet").is_file() and (tmp_path / "eval" / "eval.json").is_file()
    bad = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--ref", str(ref_dir), "--data", str(data),
                                   "--out", str(tmp_path / "eval2"), "--beta", "0"])
    assert bad.exit_code == 2 and "--beta must be a finite number > 0" in bad.output
