"""Reward ensemble: Bradley-Terry heads, out-of-fold cross-fitting, one scale, pretrained members, the run step."""

import json

import numpy as np
import polars as pl
import pytest

from curate.errors import CurateError
from curate.scores import reward
from curate.scores.reward import FeatureSet


def synthetic_features(n=400, d=16, strength=4.0, seed=0, name="x"):
    """Per-reply features whose direction theta decides (Bradley-Terry) which reply is chosen."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=d)
    theta /= np.linalg.norm(theta)
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    a_wins = rng.random(n) < 1 / (1 + np.exp(-strength * (a - b) @ theta))
    chosen = np.where(a_wins[:, None], a, b)
    rejected = np.where(a_wins[:, None], b, a)
    return FeatureSet(name, chosen, rejected)


def test_bt_head_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    fs = synthetic_features(n=300, d=5)
    diff = fs.chosen - fs.rejected
    w = reward.fit_bt_head(diff, l2=2.0)
    # both orientations, no intercept: sklearn minimises C * sum loss + |w|^2 / 2 over 2n rows
    x = np.concatenate([diff, -diff])
    y = np.r_[np.ones(len(diff)), np.zeros(len(diff))]
    ref = LogisticRegression(C=1 / (2 * 2.0), fit_intercept=False, tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_[0], atol=1e-4)


def test_cross_fit_scores_each_pair_with_a_head_that_never_saw_it():
    fs = synthetic_features(n=100, d=4)
    fold = reward.fold_ids(100, 5, seed=0)
    assert np.bincount(fold).tolist() == [20] * 5
    rc, rr = reward.cross_fit_head(fs, fold, l2=1.0)
    # recompute fold 2 by hand
    train, test = fold != 2, fold == 2
    replies = np.concatenate([fs.chosen[train], fs.rejected[train]])
    mean, std = replies.mean(0), (replies.std(0) + 1e-8) * np.sqrt(fs.dim)
    w = reward.fit_bt_head((fs.chosen[train] - fs.rejected[train]) / std, l2=1.0)
    np.testing.assert_allclose(rc[test], ((fs.chosen[test] - mean) / std) @ w)
    np.testing.assert_allclose(rr[test], ((fs.rejected[test] - mean) / std) @ w)


def test_out_of_fold_scores_do_not_memorise_noise():
    """On pure-noise features an in-sample head looks good; the out-of-fold one must not."""
    rng = np.random.default_rng(1)
    fs = FeatureSet("noise", rng.normal(size=(200, 150)), rng.normal(size=(200, 150)))
    (member,) = reward.head_members([fs], seeds=(0,), folds=5, l2=0.01)
    assert reward.oriented_auc(member.margin)["auc"] < 0.62
    w = reward.fit_bt_head(fs.chosen - fs.rejected, l2=0.01)
    assert ((fs.chosen - fs.rejected) @ w > 0).mean() > 0.95  # in-sample: memorised


def test_repeated_cross_fitting_gives_every_pair_several_oof_scores():
    sets = [synthetic_features(seed=0, name="a"), synthetic_features(seed=0, d=3, name="b")]
    members = reward.head_members(reward.ensemble_heads(sets), seeds=(0, 1, 2), folds=5)
    assert len(members) == 9  # (all, a, b) x 3 split seeds
    assert all(m.out_of_fold for m in members)
    assert {m.name for m in members} >= {"all_s0", "a_s1", "b_s2"}
    three = [synthetic_features(name=n) for n in "abc"]
    assert [h.name for h in reward.ensemble_heads(three)] == ["all", "no_a", "no_b", "no_c"]


def test_heads_learn_a_real_preference_direction():
    fs = synthetic_features(n=600, strength=4.0)
    members, margins = reward.ensemble_margins([fs], seeds=(0, 1, 2))
    quality = reward.ensemble_quality(members, margins, (0, 1, 2))
    assert quality["auc"] > 0.8
    assert len(quality["auc_per_seed"]) == 3


def test_ensemble_statistics_by_hand():
    stats = reward.ensemble_stats(np.array([[1.0, -1.0, 2.0]]))
    assert stats["rm_margin_mean"][0] == pytest.approx(2 / 3)
    assert stats["rm_margin_std"][0] == pytest.approx(np.sqrt(42 / 27))  # population std
    assert stats["rm_vote_share"][0] == pytest.approx(2 / 3)


def test_members_are_put_on_one_scale():
    rc, rr = np.array([1.0, 2.0, 3.0]), np.array([0.0, 4.0, 1.0])
    small = reward.member_from_rewards("small", rc, rr)
    big = reward.member_from_rewards("big", 100 * rc + 7, 100 * rr + 7)
    m = reward.scaled_margins([small, big])
    np.testing.assert_allclose(m[:, 0], m[:, 1])
    np.testing.assert_allclose(m[:, 0], (rc - rr) / np.concatenate([rc, rr]).std())
    with pytest.raises(CurateError, match="same reward"):
        reward.scaled_margins([reward.member_from_rewards("flat", np.ones(3), np.ones(3))])


def test_bad_input_gives_clear_errors():
    with pytest.raises(CurateError, match="too few"):
        reward.head_members([synthetic_features(n=12)], folds=5)
    with pytest.raises(CurateError, match="at least 2"):
        reward.head_members([synthetic_features(n=50)], folds=1)
    with pytest.raises(CurateError, match="NaN"):
        FeatureSet("bad", np.array([[np.nan]]), np.array([[0.0]]))
    with pytest.raises(CurateError, match="no members"):
        reward.ensemble_margins([])


def test_text_statistics_by_hand():
    stats = reward.text_statistics(["Sorry, I can't. Why? Why!", "ok"])
    assert stats.shape == (2, 9)
    np.testing.assert_allclose(stats[0, :2], np.log1p([25, 5]))
    # questions, apologies, negations, newlines, first person, second person, exclamations
    np.testing.assert_allclose(stats[0, 2:], np.log1p([1, 1, 1, 0, 1, 0, 1]))
    np.testing.assert_allclose(stats[1, 2:], 0.0)


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from curate.models import bundled_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def demo_pairs(n=6):
    from curate.data.schema import pairs_frame

    return pairs_frame([
        {"prompt": [{"role": "user", "content": f"question {i}?"}],
         "chosen": "a short answer" + " yes" * i, "rejected": "no" * (i + 1) + "!", "meta": {"i": i}}
        for i in range(n)
    ])


def test_pretrained_reward_member_is_batch_invariant(tiny_reward_model):
    pairs = demo_pairs()
    member = reward.pretrained_member(tiny_reward_model, pairs, device="cpu", batch_size=4)
    assert member.kind == "pretrained" and member.out_of_fold
    assert np.isfinite(member.margin).all() and member.margin.std() > 0
    one = reward.pretrained_rewards(tiny_reward_model, pairs["prompt"].to_list(), pairs["chosen"].to_list(),
                                    device="cpu", batch_size=1)
    np.testing.assert_allclose(member.reward_chosen, one, atol=1e-4)  # padding changes nothing


def test_pretrained_member_that_fails_to_load_is_a_clear_error(tmp_path):
    with pytest.raises(CurateError, match="failed to load"):
        reward.pretrained_member(str(tmp_path / "missing"), demo_pairs(), device="cpu")


def test_score_reward_and_noise_writes_columns_and_manifest(tmp_path, tiny_reward_model):
    from curate.rundir import RunDir

    rng = np.random.default_rng(0)
    n = 60
    pairs = demo_pairs(n)
    run = RunDir(tmp_path / "run")
    run.write_pairs(pairs, pl.DataFrame())
    fs = synthetic_features(n=n, d=8)
    pooled = {"pair_id": np.array(pairs["pair_id"].to_list()), "sum_chosen": 3 * fs.chosen,
              "sum_rejected": 2 * fs.rejected, "len_chosen": np.full(n, 3), "len_rejected": np.full(n, 2)}
    np.savez(run / "pooled.npz", **pooled)
    logps = rng.normal(size=(n, 2))
    run.merge_scores(pl.DataFrame({"pair_id": pairs["pair_id"], "logp_chosen": logps[:, 0], "logp_rejected": logps[:, 1],
                                   "logp_mean_chosen": logps[:, 0] / 3, "logp_mean_rejected": logps[:, 1] / 2}))
    table = reward.score_reward_and_noise(run, embedder=None, reward_models=[tiny_reward_model], device="cpu",
                                          seeds=(0, 1, 2), folds=3)
    scores = run.scores()
    for col in ("rm_margin_mean", "rm_margin_std", "rm_vote_share", "p_chosen", "p_label", "rm_out_of_fold", "flip_prob"):
        assert col in scores.columns
    assert scores.height == n and table.height == n
    member_cols = [c for c in scores.columns if c.startswith("rm_m_")]
    assert len(member_cols) == 4 * 3 + 1  # (all, no_policy, no_policy_logp, no_text_stats) x 3 seeds + the RM
    assert "logp_chosen" in scores.columns  # other steps' columns are kept
    assert scores["rm_out_of_fold"].all()
    assert ((scores["flip_prob"] >= 0) & (scores["flip_prob"] <= 1)).all()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["reward"]["policy_states"] is True
    assert set(manifest["reward"]["feature_sets"]) == {"policy", "policy_logp", "text_stats"}
    assert 0 <= manifest["reward"]["oof_auc"] <= 1
    noise_info = manifest["noise"]
    assert noise_info["default_estimator"] == "mixture"
    assert {"em", "cleanlab", "margin", "anchor", "mixture"} <= set(noise_info["estimators"])
    low, high = noise_info["flip_rate_interval"]
    assert 0 <= low <= noise_info["flip_rate"] <= high <= 0.5
    assert isinstance(noise_info["identifiable"], bool)
    assert noise_info["conservative_rate"] == (noise_info["flip_rate"] if noise_info["identifiable"] else low)
    assert "prompt" in manifest["reward"]["fold_grouping"]
    # the policy states were read from the run, aligned by pair_id (mean = sum / length)
    got = reward.policy_feature_set(run, pairs["pair_id"].to_list()[::-1])
    np.testing.assert_allclose(got.chosen, fs.chosen[::-1])


def test_pooled_states_of_several_probe_layers_are_one_block_each():
    mean = np.arange(12.0).reshape(2, 6)
    pooled = {"pair_id": np.array(["a", "b"]), "mean_chosen": mean, "mean_rejected": -mean}
    assert reward.policy_feature_set(None, ["b", "a"], pooled).block_dims == (6,)  # older runs: one block
    got = reward.policy_feature_set(None, ["b", "a"], {**pooled, "layers": np.array([16, 20, 24])})
    assert got.block_dims == (2, 2, 2)
    np.testing.assert_array_equal(got.chosen, mean[::-1])
    np.testing.assert_array_equal(got.column_block_width(), [2.0] * 6)


def test_missing_policy_states_for_some_pairs_warns_and_skips_them(tmp_path):
    from curate.rundir import RunDir

    run = RunDir(tmp_path)
    assert reward.policy_feature_set(run, ["a"]) is None  # no CHES pass yet
    np.savez(run.path / "pooled.npz", pair_id=np.array(["a"]), mean_chosen=np.ones((1, 2)), mean_rejected=np.zeros((1, 2)))
    with pytest.warns(UserWarning, match="no pooled policy states"):
        assert reward.policy_feature_set(run, ["a", "b"]) is None


def test_an_uninformative_ensemble_is_flagged():
    rng = np.random.default_rng(3)
    fs = FeatureSet("noise", rng.normal(size=(200, 5)), rng.normal(size=(200, 5)))
    with pytest.warns(UserWarning, match="near chance"):
        _, info = reward.reward_and_noise([fs], seeds=(0, 1, 2))
    assert info["noise"]["warnings"] and info["reward"]["warnings"]


def test_a_strong_narrow_block_keeps_its_strength_next_to_a_wide_one():
    """A 1-dim feature with AUC ~0.95 beside a 576-dim noise block: the joint head keeps ~its AUC."""
    rng = np.random.default_rng(0)
    n = 1200
    strong_c, strong_r = rng.normal(size=n), rng.normal(size=n)
    keep = rng.random(n) < 1 / (1 + np.exp(-4 * (strong_c - strong_r)))
    strong_c, strong_r = np.where(keep, strong_c, strong_r), np.where(keep, strong_r, strong_c)
    strong = reward.FeatureSet("strong", strong_c, strong_r)
    wide = reward.FeatureSet("wide", rng.normal(size=(n, 576)), rng.normal(size=(n, 576)))
    joint = reward.concat_feature_sets([strong, wide])
    assert joint.block_dims == (1, 576)
    np.testing.assert_array_equal(joint.column_block_width()[:2], [1.0, 576.0])
    (alone,) = reward.head_members([strong], seeds=(0,))
    (both,) = reward.head_members([joint], seeds=(0,))
    auc_alone = reward.oriented_auc(alone.margin)["auc"]
    auc_both = reward.oriented_auc(both.margin)["auc"]
    assert auc_alone > 0.9
    assert auc_both > auc_alone - 0.02


@pytest.fixture(scope="module")
def tiny_cross_encoder_rm(tmp_path_factory):
    """A tiny random DeBERTa-v2 sequence classifier with MiniLM's BERT tokenizer (no chat template)."""
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    from curate.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_labels=1, type_vocab_size=2, max_position_embeddings=256, initializer_range=0.5,
                          pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("deberta_rm")
    DebertaV2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _direct_rewards(path, inputs, **kwargs):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        return np.array([model(**tok(*x, return_tensors="pt", **kwargs)).logits[0, 0].item() for x in inputs])


def test_cross_encoder_reward_models_read_the_question_answer_pair(tiny_cross_encoder_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pairs = demo_pairs()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder_rm)
    tok = AutoTokenizer.from_pretrained(tiny_cross_encoder_rm)
    assert reward.rm_input_format(model, tok) == "pair"
    got = reward.pretrained_rewards(tiny_cross_encoder_rm, pairs["prompt"].to_list(), pairs["chosen"].to_list(),
                                    device="cpu", batch_size=4)
    expected = _direct_rewards(tiny_cross_encoder_rm,
                               [(p[-1]["content"], c) for p, c in zip(pairs["prompt"].to_list(), pairs["chosen"].to_list())])
    assert np.ptp(expected) > 1e-2  # the random model's rewards differ between inputs
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.ptp(expected))
    # the one-string rendering is a different input, with different rewards
    plain = reward.pretrained_rewards(tiny_cross_encoder_rm, pairs["prompt"].to_list(), pairs["chosen"].to_list(),
                                      device="cpu", input_format="plain")
    assert np.abs(plain - got).max() > 1e-2 * np.ptp(expected)
    with pytest.raises(CurateError, match="no chat template"):
        reward.rm_input_format(model, tok, "chat")


def test_decoder_reward_models_with_a_chat_template_read_it(tiny_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pairs = demo_pairs(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    tok = AutoTokenizer.from_pretrained(tiny_reward_model)
    assert reward.rm_input_format(model, tok) == "chat"
    got = reward.pretrained_rewards(tiny_reward_model, pairs["prompt"].to_list(), pairs["chosen"].to_list(),
                                    device="cpu", batch_size=1)
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
             for p, c in zip(pairs["prompt"].to_list(), pairs["chosen"].to_list())]
    expected = _direct_rewards(tiny_reward_model, [(t,) for t in texts], add_special_tokens=False)
    assert np.ptp(expected) > 0
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.ptp(expected))


def test_nested_l2_prefers_strong_shrinkage_on_noise_and_weak_on_signal():
    rng = np.random.default_rng(3)
    grid = (0.1, 1.0, 10.0, 1000.0)
    noise_diff = rng.normal(size=(400, 20))  # labels carry nothing: shrink all the way
    assert reward.nested_l2(noise_diff, grid, seed=0) == 1000.0
    signal = rng.normal(size=(2000, 2))
    w = np.array([3.0, -2.0])
    keep = rng.random(2000) < 1 / (1 + np.exp(-signal @ w))
    signal_diff = np.where(keep[:, None], signal, -signal)  # chosen-minus-rejected with BT labels
    assert reward.nested_l2(signal_diff, grid, seed=0) <= 1.0
