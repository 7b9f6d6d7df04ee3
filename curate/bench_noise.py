"""Planted-flip benchmark for the noise-flip estimators (methods.md section 4).

There is no gold label, so estimators are validated by planting: flip a known
random fraction delta of the pairs (seeded), rerun everything that learns
from labels (the cross-fitted reward heads are retrained on the flipped
labels; frozen features and pretrained members are only swapped with their
pair, never retrained), and compare each estimator's flip rate with what
planting implies. With a natural rate eps0 the rate after planting is
eps0 (1 - delta) + (1 - eps0) delta, an increase of delta (1 - 2 eps0).

Output (``run_benchmark``)::

    {"default_estimator": "em",
     "results": [{"estimator", "planted_rate", "estimated_rate", "natural_rate",
                  "auroc", "true_rate"?, "ensemble_auc"}, ...],
     "consistency": {estimator: {"eps0", "increase", "expected_increase", "error"}},
     ...}

``natural_rate`` is the eps0 the estimate implies: (estimate - delta) / (1 - 2 delta).
``auroc`` is the AUROC of the estimator's per-pair ``flip_prob`` for the
planted pairs (None at delta = 0). ``true_rate`` appears when the data carry
the truth (``meta.planted_flip`` on the shipped demo data), with
``auroc_wrong_label``: the AUROC of ``flip_prob`` for the pairs whose label is
wrong after planting. Against the planted pairs alone, natural flips count as
false positives and planted pairs that undo a natural flip as misses, so even
a perfect detector of wrong labels scores only about 1 - eps0 there.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from curate.errors import CurateError
from curate.scores import noise
from curate.scores.reward import DEFAULT_L2, FeatureSet, Member, ensemble_margins, ensemble_quality, swap_members


def planted_flips(n: int, rate: float, seed: int) -> np.ndarray:
    """Exactly round(rate * n) pairs chosen at random; nested across rates for one seed."""
    if not 0.0 <= rate < 0.5:
        raise CurateError(f"flip rate {rate} is outside [0, 0.5); planting half the labels or more erases them")
    order = np.random.default_rng(seed).permutation(n)
    planted = np.zeros(n, dtype=bool)
    planted[order[: int(round(rate * n))]] = True
    return planted


def _auroc(truth: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, score))


def run_benchmark(
    feature_sets: Sequence[FeatureSet],
    fixed_members: Sequence[Member] = (),
    *,
    flip_rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3),
    seed: int = 0,
    seeds: Sequence[int] = (0, 1, 2),
    folds: int = 5,
    l2: float = DEFAULT_L2,
    natural_flips: np.ndarray | None = None,
) -> dict[str, Any]:
    """Plant flips at each rate, retrain the heads, and score every estimator.

    ``natural_flips`` (bool per pair), when known, gives each result a
    ``true_rate``: the fraction of pairs whose label is wrong after planting.
    """
    if not feature_sets and not fixed_members:
        raise CurateError("the benchmark needs feature sets or reward-model members")
    n = len(feature_sets[0].chosen) if feature_sets else len(fixed_members[0].reward_chosen)
    rates = sorted(set(float(r) for r in flip_rates))
    results, timings = [], []
    for rate in rates:
        planted = planted_flips(n, rate, seed)
        started = time.perf_counter()
        members, margins = ensemble_margins(
            [fs.swapped(planted) for fs in feature_sets], swap_members(fixed_members, planted),
            seeds=seeds, folds=folds, l2=l2,
        )
        mean_margin = margins.mean(axis=1)
        estimates = noise.estimate_all(mean_margin, margins, seed=seed)
        timings.append(time.perf_counter() - started)
        quality = ensemble_quality(members, margins, seeds)
        for name, est in estimates.items():
            row = {
                "estimator": name,
                "planted_rate": rate,
                "n_planted": int(planted.sum()),
                "estimated_rate": est.rate,
                "natural_rate": (est.rate - rate) / (1.0 - 2.0 * rate),
                "auroc": _auroc(planted, est.flip_prob),
                "ensemble_auc": quality["auc"],
            }
            if natural_flips is not None:
                wrong = np.asarray(natural_flips, dtype=bool) ^ planted
                row["true_rate"] = float(wrong.mean())
                row["auroc_wrong_label"] = _auroc(wrong, est.flip_prob)
            results.append(row)
    return {
        "default_estimator": noise.DEFAULT_ESTIMATOR,
        "n_pairs": n,
        "flip_rates": rates,
        "seed": seed,
        "heads": {"seeds": list(seeds), "folds": folds, "l2": l2, "feature_sets": {fs.name: fs.dim for fs in feature_sets},
                  "fixed_members": [m.name for m in fixed_members]},
        "results": results,
        "consistency": consistency(results),
        "seconds_per_rate": [round(t, 2) for t in timings],
    }


def consistency(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per estimator: its increase from the lowest to the highest planted rate against delta (1 - 2 eps0_hat).

    eps0_hat is the estimator's own rate at the lowest planted rate (converted
    to a natural rate). ``error`` = increase - expected_increase.
    """
    out = {}
    for name in dict.fromkeys(r["estimator"] for r in results):
        rows = sorted((r for r in results if r["estimator"] == name), key=lambda r: r["planted_rate"])
        if len(rows) < 2:
            continue
        low, high = rows[0], rows[-1]
        eps0 = low["natural_rate"]
        delta = high["planted_rate"] - low["planted_rate"]
        expected = delta * (1.0 - 2.0 * eps0)  # rate(delta) = eps0 + delta (1 - 2 eps0)
        increase = high["estimated_rate"] - low["estimated_rate"]
        out[name] = {"eps0": eps0, "delta": delta, "increase": increase, "expected_increase": expected,
                     "error": increase - expected}
    return out


def benchmark_dataset(
    dataset: str | None = None,
    *,
    run: str | None = None,
    flip_rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3),
    seed: int = 0,
    embedder: str | None = "all-minilm-l6-v2",
    text_stats: bool = True,
    reward_models: Sequence[str] = (),
    seeds: Sequence[int] = (0, 1, 2),
    folds: int = 5,
    limit: int | None = None,
    device: str = "auto",
    cache_dir=None,
) -> dict[str, Any]:
    """Load pairs (a dataset, or a run directory with its pooled policy states) and run the benchmark."""
    from curate.data.schema import meta_of
    from curate.rundir import RunDir
    from curate.scores.reward import build_feature_sets, pretrained_member

    if (dataset is None) == (run is None):
        raise CurateError("give exactly one of --dataset or --run")
    if run is not None:
        rundir = RunDir(run)
        pairs = rundir.pairs()
    else:
        from curate.data import load_pairs

        rundir = None
        pairs = load_pairs(dataset, limit=limit).pairs
    if pairs.height == 0:
        raise CurateError(f"{dataset or run} has no usable pairs")
    started = time.perf_counter()
    feature_sets = build_feature_sets(pairs, run=rundir, embedder=embedder, text_stats=text_stats,
                                      device=device, cache_dir=cache_dir)
    fixed = [pretrained_member(name, pairs, device=device) for name in reward_models]
    features_s = time.perf_counter() - started
    truth = meta_of(pairs, "planted_flip")
    natural = None if any(t is None for t in truth) else np.array(truth, dtype=bool)
    out = run_benchmark(feature_sets, fixed, flip_rates=flip_rates, seed=seed, seeds=seeds, folds=folds,
                        natural_flips=natural)
    out["dataset"] = dataset or str(run)
    out["feature_seconds"] = round(features_s, 2)
    if natural is not None:
        out["natural_truth"] = {"source": "meta.planted_flip", "rate": float(natural.mean())}
    return out
