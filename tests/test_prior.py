"""Reward priors: the reward by hand, the file round trip, and every reason a prior is not applied."""

import numpy as np
import polars as pl
import pytest

from curate.scores import prior as prior_mod
from curate.scores.prior import RewardPrior, pair_reply_hashes, prior_feature_sets, reply_hashes
from curate.scores.reward import FeatureSet


def _pairs(n=3):
    return pl.DataFrame({
        "prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
        "chosen": [f"good {i}" for i in range(n)], "rejected": [f"bad {i}" for i in range(n)],
    })


def _prior(seen=(), sources=None, reads=("a", "b"), dims=(2, 1)):
    return RewardPrior("test", reads, dims, sources or {}, np.array([1.0, 0.0, 2.0]), np.array([0.5, -1.0, 2.0]),
                       "hand-made", 4.0, np.asarray(seen, dtype=np.uint64))


def _sets():
    a = FeatureSet("a", np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]), np.zeros((3, 2)))
    b = FeatureSet("b", np.array([2.0, 4.0, 0.0]), np.array([1.0, 1.0, 1.0]))
    return [a, b]


def test_reward_is_the_linear_probe_by_hand():
    chosen, rejected = _prior().rewards(_sets())
    # pair 0 chosen: (1-1)*0.5 + (2-0)*(-1) + (2-2)*2 = -2; rejected: (0-1)*0.5 + 0 + (1-2)*2 = -2.5
    assert chosen[0] == pytest.approx(-2.0) and rejected[0] == pytest.approx(-2.5)
    # pair 1 chosen: (3-1)*0.5 + 0 + (4-2)*2 = 5
    assert chosen[1] == pytest.approx(5.0)


def test_hashes_depend_on_prompt_and_reply():
    a = reply_hashes([[{"role": "user", "content": "q"}]], ["r"])
    assert a[0] == reply_hashes([[{"role": "user", "content": "q"}]], ["r"])[0]
    assert a[0] != reply_hashes([[{"role": "user", "content": "q2"}]], ["r"])[0]
    assert a[0] != reply_hashes([[{"role": "user", "content": "q"}]], ["r2"])[0]
    assert pair_reply_hashes(_pairs()).shape == (3, 2)


def test_round_trip(tmp_path):
    original = _prior(seen=[3, 1, 2], sources={"a": "abc"})
    original.save(tmp_path / "p.npz")
    loaded = RewardPrior.load(tmp_path / "p.npz")
    assert (loaded.name, loaded.reads, loaded.dims, loaded.sources, loaded.l2) == ("test", ("a", "b"), (2, 1), {"a": "abc"}, 4.0)
    np.testing.assert_allclose(loaded.weight, original.weight)
    assert loaded.seen.tolist() == [1, 2, 3]


def test_why_not():
    pairs = _pairs()
    hashes = pair_reply_hashes(pairs)
    sets = _sets()
    assert _prior().why_not(sets, {}, hashes) is None
    assert "no b features" in _prior().why_not(sets[:1], {}, hashes)
    assert "wide" in _prior(dims=(3, 1)).why_not(sets, {}, hashes)
    policy = [FeatureSet("policy", np.ones((3, 2)), np.zeros((3, 2)))]
    made_by_abc = _prior(sources={"policy": "abc"}, reads=("policy",), dims=(2,))
    assert "another model" in made_by_abc.why_not(policy, {"policy": "xyz"}, hashes)
    assert "another model" in made_by_abc.why_not(policy, {}, hashes)
    assert made_by_abc.why_not(policy, {"policy": "abc"}, hashes) is None
    seen_one = _prior(seen=[hashes[1, 1]]).why_not(sets, {}, hashes)
    assert "1 of the scored pairs were in the priors' training data" in seen_one


def test_prior_feature_sets_record(tmp_path, monkeypatch):
    _prior().save(tmp_path / "usable.npz")
    _prior(dims=(5, 1)).save(tmp_path / "other.npz")
    monkeypatch.setattr(prior_mod, "PRIOR_DIR", tmp_path)
    sets, record = prior_feature_sets(_sets(), _pairs(), {})
    assert [fs.name for fs in sets] == ["priors"] and sets[0].dim == 1 and sets[0].block_dims == (1,)
    np.testing.assert_allclose(sets[0].chosen[:, 0], _prior().rewards(_sets())[0])
    assert sorted(r["used"] for r in record) == [False, True]
    assert all("why_not" in r for r in record if not r["used"])


def test_score_reward_and_noise_reads_priors_that_apply(tmp_path, monkeypatch):
    """A run's ensemble gains the ``priors`` feature set, the manifest records it, and ``priors=False`` skips it."""
    from curate.data.schema import pairs_frame
    from curate.rundir import RunDir
    from curate.scores import reward

    n, d = 40, 4
    rng = np.random.default_rng(0)
    pairs = pairs_frame([{"prompt": [{"role": "user", "content": f"question {i}?"}],
                          "chosen": f"answer {i}", "rejected": f"other {i}"} for i in range(n)])
    states = rng.normal(size=(2, n, d))
    states[0, :, 0] += 1.0  # the chosen replies score higher on the first feature
    run = RunDir(tmp_path / "run")
    run.write_pairs(pairs, pl.DataFrame())
    np.savez(run / "pooled.npz", pair_id=np.array(pairs["pair_id"].to_list()), mean_chosen=states[0],
             mean_rejected=states[1])
    RewardPrior("first_feature", ("policy",), (d,), {}, np.zeros(d), np.eye(d)[0], "hand-made", 1.0,
                np.zeros(0, dtype=np.uint64)).save(tmp_path / "p.npz")
    monkeypatch.setattr(prior_mod, "PRIOR_DIR", tmp_path)
    reward.score_reward_and_noise(run, embedder=None, text_stats=False, device="cpu", folds=4)
    info = run.manifest()["reward"]
    assert info["feature_sets"] == {"policy": d, "priors": 1}
    assert info["priors"] == [{"name": "first_feature", "reads": ["policy"], "trained_on": "hand-made", "used": True}]
    reward.score_reward_and_noise(run, embedder=None, text_stats=False, device="cpu", folds=4, priors=False)
    info = run.manifest()["reward"]
    assert info["feature_sets"] == {"policy": d} and info["priors"] == []
