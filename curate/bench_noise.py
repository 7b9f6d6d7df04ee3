"""Known-truth and planted-flip benchmarks for the noise-flip estimators (methods.md section 4).

**Known truth** (:func:`known_truth_benchmark`, the headline): the user's own
pairs and features, with labels *replaced* by draws from a Bradley-Terry model
fit to those features (so the clean labels have genuine ambiguity, but no
flips), then flipped at known rates. The heads are retrained on each
resampled set and every estimator is scored against the truth: its rate and
90% interval against the known rate, and the calibration (ECE) and AUROC of
its ``flip_prob`` against the pairs actually flipped. This replaces the old
consistency figure (the slope of the estimate against planted flips, judged
against the estimator's own natural rate), which an estimator whose bias
scales with the rate passes.

There is no gold label, so estimators are validated by planting: flip a known
random fraction delta of the pairs (seeded), rerun everything that learns
from labels (the cross-fitted reward heads are retrained on the flipped
labels; frozen features and pretrained members are only swapped with their
pair, never retrained), and compare each estimator's flip rate with what
planting implies. With a natural rate eps0 the rate after planting is
eps0 (1 - delta) + (1 - eps0) delta, an increase of delta (1 - 2 eps0).

Output (``run_benchmark``)::

    {"default_estimator": "mixture",
     "results": [{"estimator", "planted_rate", "estimated_rate", "natural_rate",
                  "auroc", "true_rate"?, "ensemble_auc"}, ...],
     "known_truth": {"bayes_auc", "results": [{"estimator", "planted_rate", "true_rate",
                     "estimated_rate", "error", "interval"?, "covered"?, "ece", "auroc_wrong_label"}, ...]},
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
from curate.scores.reward import (DEFAULT_L2, FeatureSet, Member, concat_feature_sets, ensemble_margins,
                                  ensemble_quality, fit_bt_head, oriented_auc, swap_members)


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


def expected_calibration_error(prob: np.ndarray, truth: np.ndarray, *, bins: int = 10) -> float:
    """ECE of probabilities against 0/1 outcomes: sum over equal-width bins of (share) x |mean prob - rate|."""
    prob, truth = np.asarray(prob, dtype=float), np.asarray(truth, dtype=float)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(prob[inside].mean() - truth[inside].mean())
    return float(total)


def score_estimates(estimates: dict[str, noise.NoiseEstimate], wrong: np.ndarray, true_rate: float) -> list[dict[str, Any]]:
    """Per estimator against known wrong labels: rate, error, interval and its coverage, flip_prob ECE and AUROC."""
    rows = []
    for name, est in estimates.items():
        row = {"estimator": name, "true_rate": true_rate, "estimated_rate": est.rate,
               "error": est.rate - true_rate, "rate_used": est.rate_used,
               "ece": expected_calibration_error(est.flip_prob, wrong), "auroc_wrong_label": _auroc(wrong, est.flip_prob)}
        if est.interval is not None:
            low, high = est.interval
            row.update(interval=[low, high], covered=bool(low <= true_rate <= high), width=high - low,
                       identifiable=est.identifiable)
        rows.append(row)
    return rows


def bt_truth(feature_sets: Sequence[FeatureSet], *, l2: float = DEFAULT_L2) -> np.ndarray:
    """Per pair, the utility difference t (chosen minus rejected) of a Bradley-Terry model fit to all features.

    One L2 head on every block side by side (each block scaled to unit
    variance, as the ensemble's heads are), fit in-sample on the given labels:
    the known-truth model of :func:`known_truth_benchmark`.
    """
    fs = concat_feature_sets(feature_sets) if len(feature_sets) > 1 else feature_sets[0]
    both = np.concatenate([fs.chosen, fs.rejected])
    std = (both.std(axis=0) + 1e-8) * np.sqrt(fs.column_block_width())
    diff = (fs.chosen - fs.rejected) / std
    return diff @ fit_bt_head(diff, l2=l2)


def known_truth_benchmark(feature_sets: Sequence[FeatureSet], fixed_members: Sequence[Member] = (), *,
                          flip_rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3), seed: int = 0,
                          seeds: Sequence[int] = (0, 1, 2), folds: int = 5, l2: float = DEFAULT_L2,
                          groups: np.ndarray | None = None, truth_scale: float = 1.0) -> dict[str, Any]:
    """Labels from a known BT model on the user's features, flipped at known rates; every estimator scored.

    For each rate: the clean label of pair i is "chosen" with probability
    sigmoid(truth_scale * t_i) (:func:`bt_truth`), else the replies are
    swapped; then exactly round(rate * n) pairs are flipped. The heads are
    retrained on the result (pretrained members are swapped with their pair).
    ``bayes_auc`` is the AUC of t itself against the clean resampled labels,
    the best any ensemble can do on this truth.
    """
    if not feature_sets:
        raise CurateError("the known-truth benchmark needs feature sets (the truth is a model on them)")
    t = truth_scale * bt_truth(feature_sets, l2=l2)
    n = len(t)
    rng = np.random.default_rng(seed)
    clean_swap = rng.random(n) >= 1.0 / (1.0 + np.exp(-t))  # True: the clean label prefers the rejected reply
    bayes_auc = oriented_auc(np.where(clean_swap, -t, t), seed=seed)["auc"]
    rows = []
    for rate in sorted(set(float(r) for r in flip_rates)):
        flipped = planted_flips(n, rate, seed + 1)
        swap = clean_swap ^ flipped
        members, margins = ensemble_margins(
            [fs.swapped(swap) for fs in feature_sets], swap_members(fixed_members, swap),
            seeds=seeds, folds=folds, l2=l2, groups=groups,
        )
        estimates = noise.estimate_all(margins.mean(axis=1), margins, seed=seed)
        auc = ensemble_quality(members, margins, seeds)["auc"]
        for row in score_estimates(estimates, flipped, float(flipped.mean())):
            rows.append({"planted_rate": rate, "ensemble_auc": auc, **row})
    return {"bayes_auc": bayes_auc, "truth_scale": truth_scale, "n_pairs": n, "results": rows,
            "truth": "labels resampled from a Bradley-Terry model fit to these features, then flipped at known rates"}


def run_benchmark(feature_sets: Sequence[FeatureSet], fixed_members: Sequence[Member] = (), *,
                  flip_rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3), seed: int = 0, seeds: Sequence[int] = (0, 1, 2),
                  folds: int = 5, l2: float = DEFAULT_L2, natural_flips: np.ndarray | None = None,
                  groups: np.ndarray | None = None, known_truth: bool = True) -> dict[str, Any]:
    """Plant flips at each rate, retrain the heads, and score every estimator; plus the known-truth run.

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
            seeds=seeds, folds=folds, l2=l2, groups=groups,
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
            if est.interval is not None:
                row["interval"] = [float(v) for v in est.interval]
            results.append(row)
    truth = None
    if known_truth and feature_sets:
        truth = known_truth_benchmark(feature_sets, fixed_members, flip_rates=rates, seed=seed, seeds=seeds,
                                      folds=folds, l2=l2, groups=groups)
    return {
        "default_estimator": noise.DEFAULT_ESTIMATOR,
        "n_pairs": n,
        "flip_rates": rates,
        "seed": seed,
        "heads": {"seeds": list(seeds), "folds": folds, "l2": l2, "feature_sets": {fs.name: fs.dim for fs in feature_sets},
                  "fixed_members": [m.name for m in fixed_members]},
        "results": results,
        "known_truth": truth,
        "fold_grouping": "connected components (shared prompt or reply)" if groups is not None else "none",
        "seconds_per_rate": [round(t, 2) for t in timings],
    }


def benchmark_dataset(dataset: str | None = None, *, run: str | None = None,
                      flip_rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3), seed: int = 0,
                      embedder: str | None = "all-minilm-l6-v2", text_stats: bool = True,
                      reward_models: Sequence[str] = (), seeds: Sequence[int] = (0, 1, 2), folds: int = 5,
                      limit: int | None = None, device: str = "auto", cache_dir=None) -> dict[str, Any]:
    """Load pairs (a dataset, or a run directory with its pooled policy states) and run the benchmark."""
    from curate.data.schema import meta_of
    from curate.rundir import is_run_dir, resolve_pairs
    from curate.scores.reward import build_feature_sets, pretrained_member

    if (dataset is None) == (run is None):
        raise CurateError("give exactly one of --dataset or --run")
    if run is not None and not is_run_dir(run):
        raise CurateError(f"--run {run} is not a run directory (no pairs.parquet)")
    resolved = resolve_pairs(dataset or run, limit=limit)
    pairs, rundir = resolved.pairs, resolved.run
    if pairs.height == 0:
        raise CurateError(f"{dataset or run} has no usable pairs")
    started = time.perf_counter()
    feature_sets = build_feature_sets(pairs, run=rundir, embedder=embedder, text_stats=text_stats,
                                      device=device, cache_dir=cache_dir)
    fixed = [pretrained_member(name, pairs, device=device) for name in reward_models]
    features_s = time.perf_counter() - started
    truth = meta_of(pairs, "planted_flip")
    natural = None if any(t is None for t in truth) else np.array(truth, dtype=bool)
    from curate.folds import pair_groups

    groups, grouping = pair_groups(pairs)
    out = run_benchmark(feature_sets, fixed, flip_rates=flip_rates, seed=seed, seeds=seeds, folds=folds,
                        natural_flips=natural, groups=groups)
    out["fold_grouping"] = grouping
    out["dataset"] = dataset or str(run)
    out["feature_seconds"] = round(features_s, 2)
    if natural is not None:
        out["natural_truth"] = {"source": "meta.planted_flip", "rate": float(natural.mean())}
    return out
