"""WIMHF features: the statistics by hand, the signed SAE, the pipeline and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate import features as F
from curate.data.schema import pairs_frame
from curate.errors import CurateError

DEMO = Path(__file__).resolve().parents[1] / "data/demo/pairs.jsonl"


# ---------------------------------------------------------------- statistics
def test_fit_logistic_matches_the_closed_form_for_a_binary_covariate():
    # 2x2 table: x=0 -> 30 wins / 70 losses, x=1 -> 60 wins / 40 losses.
    x = np.r_[np.zeros(100), np.ones(100)]
    y = np.r_[np.ones(30), np.zeros(70), np.ones(60), np.zeros(40)]
    beta, se, loglik = F.fit_logistic(np.column_stack([np.ones_like(x), x]), y)
    assert beta[0] == pytest.approx(math.log(30 / 70), abs=1e-8)
    assert beta[1] == pytest.approx(math.log(60 / 40) - math.log(30 / 70), abs=1e-8)
    # Wald SE of a log odds ratio: sqrt(1/a + 1/b + 1/c + 1/d)
    assert se[1] == pytest.approx(math.sqrt(1 / 30 + 1 / 70 + 1 / 60 + 1 / 40), abs=1e-8)
    # saturated model: each cell's log-likelihood is sum of log of its own win rate
    expected = 30 * math.log(0.3) + 70 * math.log(0.7) + 60 * math.log(0.6) + 40 * math.log(0.4)
    assert loglik == pytest.approx(expected, abs=1e-8)
    # likelihood-ratio test against the intercept-only model (overall rate 90/200)
    null = 90 * math.log(0.45) + 110 * math.log(0.55)
    lr = 2 * (expected - null)
    assert F.likelihood_ratio_p_value(loglik, null) == pytest.approx(math.erfc(math.sqrt(lr / 2)), rel=1e-9)


def test_fit_logistic_matches_statsmodels():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(1)
    X = np.column_stack([np.ones(300), rng.normal(size=300), rng.normal(size=300)])
    y = (rng.random(300) < 1 / (1 + np.exp(-(0.3 + X[:, 1] - 0.5 * X[:, 2])))).astype(float)
    beta, se, loglik = F.fit_logistic(X, y)
    ref = sm.Logit(y, X).fit(disp=0)
    np.testing.assert_allclose(beta, ref.params, atol=1e-6)
    np.testing.assert_allclose(se, ref.bse, atol=1e-6)
    assert loglik == pytest.approx(ref.llf, abs=1e-8)
    assert F.wald_p_value(beta[2], se[2]) == pytest.approx(ref.pvalues[2], rel=1e-5)
    reduced = sm.Logit(y, X[:, :2]).fit(disp=0)
    expected = float(scipy_chi2_sf(2 * (ref.llf - reduced.llf)))
    assert F.likelihood_ratio_p_value(loglik, F.fit_logistic(X[:, :2], y)[2]) == pytest.approx(expected, rel=1e-6)


def scipy_chi2_sf(statistic):
    from scipy.stats import chi2

    return chi2.sf(statistic, df=1)


def test_separating_feature_is_significant():
    # The Wald test reports p ~ 1 when a feature separates the labels; the LR test must not.
    rng = np.random.default_rng(0)
    orientation = F.random_orientation(200, seed=0)
    a_chosen = (orientation > 0).astype(float)
    act = orientation * rng.uniform(0.5, 1.0, 200)  # the chosen side always has more of it
    table = F.feature_effects(act[:, None], rng.normal(size=200), a_chosen)
    assert table["p_value"][0] < 1e-20
    assert table["win_rate_delta"][0] > 0.45


def test_wald_p_value_by_hand():
    assert F.wald_p_value(1.959963984540054, 1.0) == pytest.approx(0.05, abs=1e-9)
    assert F.wald_p_value(-1.959963984540054, 1.0) == pytest.approx(0.05, abs=1e-9)
    assert F.wald_p_value(1.0, 0.0) == 1.0


def test_signal_fractions_by_hand():
    out = F.signal_fractions(auc_sae=0.70, auc_probe=0.75, auc_probe_length=0.72, auc_length=0.60)
    assert out["signal_fraction"] == pytest.approx(0.2 / 0.25)
    assert out["signal_fraction_beyond_length"] == pytest.approx(0.10 / 0.12)
    assert F.signal_fractions(0.6, 0.5, 0.6, 0.6) == {"signal_fraction": None, "signal_fraction_beyond_length": None}


def test_feature_effects_sign_prevalence_and_bonferroni():
    rng = np.random.default_rng(0)
    n = 2000
    orientation = F.random_orientation(n, seed=3)
    a_chosen = (orientation > 0).astype(float)
    length = rng.normal(size=n) * 10
    # feature 0: the chosen side has more of it in 90% of the pairs where it fires (half the pairs)
    fires = rng.random(n) < 0.5
    agree = np.where(rng.random(n) < 0.9, 1.0, -1.0)
    f0 = np.where(fires, orientation * agree * rng.uniform(0.5, 1.5, n), 0.0)
    f1 = np.where(rng.random(n) < 0.3, rng.normal(size=n), 0.0)  # unrelated to the label
    f2 = np.zeros(n)  # never fires
    table = F.feature_effects(np.column_stack([f0, f1, f2]), length, a_chosen)
    row0, row1, row2 = table.rows(named=True)
    assert row0["prevalence"] == pytest.approx(fires.mean())
    assert row0["coef"] > 0 and row0["p_bonferroni"] < 1e-10
    # with no length effect the marginal win-rate gain is close to 0.9 - 0.5
    assert 0.3 < row0["win_rate_delta"] < 0.45
    assert row1["p_value"] > 0.001 and abs(row1["win_rate_delta"]) < 0.05
    assert row2 == {"feature": 2, "prevalence": 0.0, "coef": 0.0, "p_value": 1.0, "win_rate_delta": 0.0,
                    "p_bonferroni": 1.0}
    assert row1["p_bonferroni"] == pytest.approx(min(1.0, 3 * row1["p_value"]))


def test_random_orientation_and_group_split_are_seeded():
    o = F.random_orientation(1000, seed=0)
    assert set(np.unique(o)) == {-1.0, 1.0} and abs(o.mean()) < 0.1
    np.testing.assert_array_equal(o, F.random_orientation(1000, seed=0))
    groups = [f"g{i // 3}" for i in range(300)]
    val = F.split_by_group(groups, 0.2, seed=0)
    assert val.sum() == 60  # 20 of 100 groups, 3 rows each
    for g in set(groups):  # a group never straddles the split
        assert len({bool(v) for v, gg in zip(val, groups) if gg == g}) == 1
    np.testing.assert_array_equal(val, F.split_by_group(groups, 0.2, seed=0))


def test_distinguishing_ngrams():
    high = ["I'm sorry, I can't help with that.", "Sorry, I can't do that.", "I can't assist, sorry."]
    low = ["Sure, here is how.", "Sure! Step one is easy.", "Here is the plan."]
    more, less = F.distinguishing_ngrams(high, low, n=3)
    assert "can't" in more or "i can't" in more
    assert any("sure" in g for g in less)
    assert not set(more) & set(less)


# ---------------------------------------------------------------- the signed SAE
def _planted_atoms(n=1000, d=16, m=6, seed=0):
    """Each row is one of m unit atoms times a signed magnitude in +-[1, 2], plus a little noise."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(m, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n, m))
    codes[np.arange(n), rng.integers(0, m, n)] = rng.choice([-1.0, 1.0], n) * rng.uniform(1.0, 2.0, n)
    return codes @ atoms + 0.01 * rng.normal(size=(n, d)), codes


def test_signed_sae_recovers_planted_signed_atoms_and_reloads(tmp_path):
    from sae_lens import SAE

    from curate.sae import encode, load_sae, save_sae, train_signed_sae

    x, codes = _planted_atoms()
    kwargs = dict(n_features=8, k=1, prefixes=None, batch_size=128, lr=5e-3, max_epochs=30, seed=1)
    result = train_signed_sae(x[:800], x[800:], **kwargs)
    acts = encode(result.sae, x)
    assert ((acts != 0).sum(axis=1) == 1).all()  # per-example top-k, not batch-level
    assert (acts < 0).any() and (acts > 0).any()  # signed
    with np.errstate(invalid="ignore", divide="ignore"):  # a never-active feature has no correlation
        corr = np.nan_to_num(np.abs(np.corrcoef(np.c_[acts, codes].T)[:8, 8:]))
    # A ReLU SAE would only see one sign of each atom (|corr| about 0.7); the signed one finds them whole.
    assert (corr.max(axis=0) > 0.95).sum() >= 5
    assert result.history["val_mse"][result.best_epoch - 1] < 0.1 * np.mean(np.sum(x**2, axis=1))
    save_sae(result.sae, tmp_path / "sae")
    reloaded = SAE.load_from_disk(str(tmp_path / "sae"))
    assert reloaded.cfg.architecture() == "abstopk"
    np.testing.assert_allclose(encode(reloaded, x), acts, atol=1e-5)
    np.testing.assert_allclose(encode(load_sae(tmp_path / "sae"), x), acts, atol=1e-5)
    # seeded: the same call gives the same SAE
    short = dict(kwargs, max_epochs=2, min_epochs=2)
    np.testing.assert_array_equal(encode(train_signed_sae(x[:800], x[800:], **short).sae, x),
                                  encode(train_signed_sae(x[:800], x[800:], **short).sae, x))


def test_matryoshka_loss_has_one_term_per_inner_prefix():
    import torch
    from sae_lens.saes.sae import TrainStepInput

    from curate.sae import MatryoshkaAbsTopKTrainingSAE, MatryoshkaAbsTopKTrainingSAEConfig, matryoshka_widths

    assert matryoshka_widths(32, (8, 32)) == [8, 32]
    assert matryoshka_widths(6, (8, 32)) == [6]
    sae = MatryoshkaAbsTopKTrainingSAE(MatryoshkaAbsTopKTrainingSAEConfig(d_in=5, d_sae=6, k=2, matryoshka_widths=[2, 6]))
    x = torch.randn(4, 5)
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                   n_training_steps=0, is_logging_step=False))
    assert set(out.losses) >= {"mse_loss", "inner_mse_loss_2"}
    # by hand: the prefix reconstruction uses only the first 2 features
    acts = out.feature_acts.detach()
    w = sae.W_dec.detach()
    recon = (acts[:, :2] / w[:2].norm(dim=-1)) @ w[:2] + sae.b_dec.detach()
    assert out.losses["inner_mse_loss_2"].item() == pytest.approx((recon - x).pow(2).sum(-1).mean().item(), rel=1e-5)
    with pytest.raises(ValueError):
        MatryoshkaAbsTopKTrainingSAE(MatryoshkaAbsTopKTrainingSAEConfig(d_in=5, d_sae=6, k=2, matryoshka_widths=[4, 3]))


# ---------------------------------------------------------------- the pipeline
def _planted_pairs(n=240, d=24, seed=0):
    """Half refusal-vs-compliance pairs (refusal chosen), half verbose-vs-terse; embeddings planted."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(4, d))
    rows, e_c, e_r = [], [], []
    for i in range(n):
        refusal = i % 2 == 0
        if refusal:
            chosen, rejected = "I'm sorry, I can't help with that.", f"Sure, here is how to do it, step {i}."
            diff = atoms[0]
        else:
            chosen, rejected = f"Here is a long and careful answer number {i}.", f"No idea {i}."
            diff = atoms[1]
        rows.append({"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": chosen,
                     "rejected": rejected, "meta": {"contrast": "refusal" if refusal else "verbosity"}})
        base = rng.normal(size=d)
        noise = 0.05 * rng.normal(size=d)
        e_c.append(base + diff * rng.uniform(0.5, 1.5) + noise)
        e_r.append(base)
    return pairs_frame(rows), (np.array(e_c, dtype=np.float32), np.array(e_r, dtype=np.float32))


SMALL = dict(n_features=8, k=2, prefixes=(4, 8), lr=5e-3, max_epochs=30, batch_size=64, device="cpu")


@pytest.fixture(scope="module")
def planted():
    """The planted pairs and their feature result, computed once for the tests below."""
    pairs, embeddings = _planted_pairs()
    return pairs, F.compute_features(pairs, settings=F.FeatureSettings(**SMALL), embeddings=embeddings)


def test_compute_features_finds_the_planted_contrast(planted):
    pairs, result = planted
    assert result.table.height == 8
    assert result.activations.columns == ["pair_id"] + [f"sae_f{j}" for j in range(8)]
    contrast = dict(zip(pairs["pair_id"], [json.loads(m)["contrast"] for m in pairs["meta"]]))
    purities = []
    for row in result.table.rows(named=True):
        if row["top_pair_ids"]:
            kinds = [contrast[p] for p in row["top_pair_ids"]]
            purities.append(max(kinds.count("refusal"), kinds.count("verbosity")) / len(kinds))
    assert max(purities) == 1.0
    refusal_rows = [r for r in result.table.rows(named=True) if "sorry" in r["more"] or "i'm sorry" in r["more"]]
    # the refusal is always the chosen reply, so the feature that carries it wins almost always
    assert refusal_rows and max(r["win_rate_active"] for r in refusal_rows) > 0.9
    assert min(result.table["p_value"]) < 1e-6
    s = result.summary
    for key in ("auc_sae", "auc_probe", "auc_probe_length", "auc_length", "signal_fraction",
                "signal_fraction_beyond_length"):
        assert key in s
    assert s["auc_sae"] > 0.9  # the planted directions are in every pair, so the label is predictable
    assert s["n_sae_train_pairs"] + s["n_sae_val_pairs"] == 240


def test_too_few_pairs_and_constant_embeddings_are_clear_errors():
    pairs, (e_c, e_r) = _planted_pairs(n=40)
    with pytest.raises(CurateError, match="lower --n-features"):
        F.compute_features(pairs, settings=F.FeatureSettings(n_features=32), embeddings=(e_c, e_r))
    with pytest.raises(CurateError, match="identical"):
        F.compute_features(pairs, settings=F.FeatureSettings(n_features=4, k=2), embeddings=(e_c, e_c))
    with pytest.raises(CurateError, match="--k"):
        F.compute_features(pairs, settings=F.FeatureSettings(n_features=4, k=5), embeddings=(e_c, e_r))


def test_run_features_writes_the_run_dir_and_top_pairs(tmp_path, monkeypatch, planted):
    from curate.rundir import RunDir

    pairs, computed = planted
    run = RunDir(tmp_path / "run")
    run.write_pairs(pairs, pl.DataFrame())
    run.merge_scores(pl.DataFrame({"pair_id": pairs["pair_id"], "other_signal": np.arange(pairs.height)}))
    run.merge_scores(pl.DataFrame({"pair_id": pairs["pair_id"], "sae_f30": np.zeros(pairs.height)}))  # stale, larger SAE

    seen = {}

    def fake_compute(p, **kwargs):
        seen.update(kwargs, pairs=p)
        return computed

    monkeypatch.setattr(F, "compute_features", fake_compute)
    F.run_features(run.path, settings=F.FeatureSettings(**SMALL))
    assert seen["pairs"]["pair_id"].to_list() == pairs["pair_id"].to_list()
    assert Path(seen["cache_dir"]) == run.path / "cache"
    table = pl.read_parquet(run / "features.parquet")
    for column in ("feature", "prevalence", "win_rate_delta", "p_value", "description"):
        assert column in table.columns
    summary = json.loads((run / "features_summary.json").read_text())
    assert summary["settings"]["n_features"] == 8
    scores = run.scores()
    assert "other_signal" in scores.columns and "sae_f7" in scores.columns and scores.height == pairs.height
    assert "sae_f30" not in scores.columns
    assert run.manifest()["features"]["columns"][0] == "sae_f0"
    assert (run / "sae" / "cfg.json").exists()

    best = table.sort("prevalence", descending=True)["feature"][0]
    top = F.top_pairs(run.path, best, n=3, sign="abs")
    assert top.height == 3 and set(top.columns) == {"pair_id", "activation", "chosen", "rejected"}
    assert np.all(np.diff(np.abs(top["activation"].to_numpy())) <= 0)
    with pytest.raises(CurateError, match="feature 99 does not exist"):
        F.top_pairs(run.path, 99)
    with pytest.raises(CurateError, match="sign"):
        F.top_pairs(run.path, 0, sign="up")


def test_run_features_without_pairs_names_the_fix(tmp_path):
    with pytest.raises(CurateError, match="--dataset"):
        F.run_features(tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.skipif(not DEMO.exists(), reason="demo data not shipped yet")
def test_demo_planted_contrast_dominates_a_feature(tmp_path):
    """Real MiniLM on the shipped demo: some feature's top pairs come from one constructed contrast."""
    result = F.run_features(tmp_path / "run", dataset=str(DEMO), settings=F.FeatureSettings(n_features=16, prefixes=(4, 16)))
    pairs = pl.read_parquet(tmp_path / "run" / "pairs.parquet")
    category = dict(zip(pairs["pair_id"], [json.loads(m)["category"] for m in pairs["meta"]]))
    best = 0.0
    for column in [c for c in result.activations.columns if c.startswith("sae_f")]:
        top = result.activations.sort(pl.col(column).abs(), descending=True).head(10)
        if (top[column] != 0).all():
            kinds = [category[p] for p in top["pair_id"]]
            best = max(best, max(kinds.count(k) for k in set(kinds)) / len(kinds))
    assert best >= 0.9


def test_cli_features_on_a_run_dir(tmp_path, monkeypatch, planted):
    from typer.testing import CliRunner

    from curate.cli import app
    from curate.rundir import RunDir

    pairs, computed = planted
    run = RunDir(tmp_path / "run")
    run.write_pairs(pairs, pl.DataFrame())
    settings_seen = []
    monkeypatch.setattr(F, "compute_features", lambda p, **kw: settings_seen.append(kw["settings"]) or computed)
    runner = CliRunner()
    args = ["features", str(run.path), "--n-features", "8", "--k", "2", "--prefixes", "4,8", "--lr", "5e-3",
            "--epochs", "30", "--batch-size", "64", "--device", "cpu"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["features"]) == 8 and "signal_fraction" in payload["summary"]
    assert settings_seen[0] == F.FeatureSettings(n_features=8, k=2, prefixes=(4, 8), lr=5e-3, max_epochs=30,
                                                 batch_size=64, device="cpu")
    shown = runner.invoke(app, args + ["--top", "3"])
    assert shown.exit_code == 0 and "signal fraction" in shown.output
    missing = runner.invoke(app, ["features"])
    assert missing.exit_code == 2 and "name a run directory" in missing.output
    bad = runner.invoke(app, ["features", str(run.path), "--prefixes", "8;32"])
    assert bad.exit_code == 2 and "--prefixes" in bad.output


def test_group_folds_and_cross_fitted_auc():
    groups = [f"g{i // 2}" for i in range(200)]
    folds = F.group_folds(groups, 5, seed=0)
    assert sorted(np.bincount(folds)) == [40] * 5
    assert all(folds[i] == folds[i + 1] for i in range(0, 200, 2))  # both rows of a group in one fold
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100), np.ones(100)]
    separable = (y * 2 - 1)[:, None] + 0.1 * rng.normal(size=(200, 1))
    assert F.cross_fitted_auc(separable, y, F.group_folds([str(i) for i in range(200)], 5, 0)) == 1.0
    noise = rng.normal(size=(200, 3))
    assert abs(F.cross_fitted_auc(noise, y, F.group_folds([str(i) for i in range(200)], 5, 0)) - 0.5) < 0.15
