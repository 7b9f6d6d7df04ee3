"""Planted-flip benchmark: seeded planting, retrained heads, the JSON shape, the CLI."""

import json

import numpy as np
import pytest

from curate.bench_noise import bt_truth, expected_calibration_error, known_truth_benchmark, planted_flips, run_benchmark
from curate.errors import CurateError
from curate.scores import noise
from curate.scores.reward import FeatureSet


def test_planted_flips_are_exact_seeded_and_nested():
    a = planted_flips(1000, 0.1, seed=3)
    b = planted_flips(1000, 0.3, seed=3)
    assert a.sum() == 100 and b.sum() == 300
    assert (a <= b).all()  # the 10% are among the 30%
    assert (planted_flips(1000, 0.1, seed=3) == a).all()
    assert not (planted_flips(1000, 0.1, seed=4) == a).all()
    with pytest.raises(CurateError, match="outside"):
        planted_flips(10, 0.5, seed=0)


def synthetic_with_natural_flips(n=1500, d=12, eps0=0.1, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=d)
    theta /= np.linalg.norm(theta)
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    a_wins = rng.random(n) < 1 / (1 + np.exp(-8.0 * (a - b) @ theta))
    natural = rng.random(n) < eps0
    a_chosen = a_wins ^ natural
    chosen = np.where(a_chosen[:, None], a, b)
    rejected = np.where(a_chosen[:, None], b, a)
    return FeatureSet("x", chosen, rejected), natural


def test_benchmark_tracks_the_truth_on_synthetic_pairs():
    fs, natural = synthetic_with_natural_flips()
    out = run_benchmark([fs], flip_rates=(0.0, 0.1, 0.2, 0.3), natural_flips=natural, seed=0)
    assert out["default_estimator"] == noise.DEFAULT_ESTIMATOR
    rows = [r for r in out["results"] if r["estimator"] == out["default_estimator"]]
    assert [r["planted_rate"] for r in rows] == [0.0, 0.1, 0.2, 0.3]
    for r in rows:
        assert set(r) >= {"estimator", "planted_rate", "estimated_rate", "natural_rate", "auroc", "true_rate",
                          "auroc_wrong_label"}
        assert r["estimated_rate"] == pytest.approx(r["true_rate"], abs=0.05)
        # every rate has wrong labels (the natural ones), so this AUROC always exists
        assert r["auroc_wrong_label"] > 0.8
        if r["planted_rate"] > 0:
            assert r["auroc"] > 0.8
        else:
            assert r["auroc"] is None
        # natural rate implied by the estimate: (rate - delta) / (1 - 2 delta)
        assert r["natural_rate"] == pytest.approx((r["estimated_rate"] - r["planted_rate"]) / (1 - 2 * r["planted_rate"]))
    # the heads were retrained on the flipped labels: their AUC against those labels falls
    auc = [r["ensemble_auc"] for r in rows]
    assert auc[0] > auc[-1] + 0.1
    json.dumps(out)  # serialisable as is


def test_expected_calibration_error_by_hand():
    # bin [0.1, 0.2): probs 0.1, 0.1, outcomes 0, 1 -> |0.1 - 0.5| = 0.4 on half the rows;
    # bin [0.9, 1.0]: probs 0.9, 0.9, outcomes 1, 1 -> |0.9 - 1| = 0.1 on the other half
    ece = expected_calibration_error(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 1, 1, 1]))
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0


def test_bt_truth_is_the_in_sample_bradley_terry_fit():
    fs, _ = synthetic_with_natural_flips(n=800, eps0=0.0)
    t = bt_truth([fs])
    assert (t > 0).mean() > 0.8  # the labels follow the features
    assert np.corrcoef(t, (fs.chosen - fs.rejected).sum(axis=1))[0, 1] != 0


def test_known_truth_benchmark_scores_estimators_against_the_flips_it_planted():
    fs, _ = synthetic_with_natural_flips(n=1500, eps0=0.0)
    out = known_truth_benchmark([fs], flip_rates=(0.0, 0.2), seed=0)
    assert out["bayes_auc"] > 0.85
    rows = {(r["estimator"], r["planted_rate"]): r for r in out["results"]}
    for rate in (0.0, 0.2):
        r = rows[(noise.DEFAULT_ESTIMATOR, rate)]
        assert r["true_rate"] == pytest.approx(rate, abs=1e-3)
        assert r["covered"] and r["interval"][0] <= r["true_rate"] <= r["interval"][1]
        assert abs(r["error"]) < 0.05 and r["ece"] < 0.05
    # an estimator that calls BT ambiguity flips is visibly off on the clean set
    assert rows[("margin", 0.0)]["estimated_rate"] > rows[(noise.DEFAULT_ESTIMATOR, 0.0)]["estimated_rate"] + 0.03
    json.dumps(out)


def test_cli_bench_noise_writes_the_json_shape(tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        # short, question-free answers are preferred; 10% of labels are flipped
        good = "Sure. " + "fine " * int(rng.integers(1, 6))
        bad = "Why? " * int(rng.integers(1, 4)) + "No! " * int(rng.integers(3, 12))
        flipped = bool(rng.random() < 0.1)
        chosen, rejected = (bad, good) if flipped else (good, bad)
        rows.append({"prompt": f"question {i}", "chosen": chosen, "rejected": rejected, "meta": {"planted_flip": flipped}})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "noise", "--dataset", str(path), "--flip-rates", "0,0.2",
                                      "--embedder", "none", "--split-seeds", "0,1,2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["default_estimator"] == "mixture"
    assert data["fold_grouping"].startswith("grouped by prompt only")  # its short replies repeat
    assert {r["planted_rate"] for r in data["known_truth"]["results"]} == {0.0, 0.2}
    assert {r["planted_rate"] for r in data["results"]} == {0.0, 0.2}
    assert data["natural_truth"]["rate"] == pytest.approx(np.mean([r["meta"]["planted_flip"] for r in rows]))
    assert all("true_rate" in r for r in data["results"])


def test_cli_bench_noise_rejects_bad_rates(tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    result = CliRunner().invoke(app, ["bench", "noise", "--dataset", "x.jsonl", "--flip-rates", "a,b"])
    assert result.exit_code == 2
