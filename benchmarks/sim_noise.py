"""Simulation grid for the noise estimators: bias, RMSE, 90% interval coverage and flip_prob calibration.

    PYTHONPATH=. .venv/bin/python benchmarks/sim_noise.py [--quick] [--reps 3] [--out benchmarks/results/sim_noise.json]

Each cell: true flip rate eps in {0, .05, .1, .2, .3} x Bayes AUC in {0.65, 0.7,
0.8, 0.9} x n in {1k, 10k} pairs, ``--reps`` replicates (``--quick``: one
replicate, n = 1k only). A replicate draws per-reply features x ~ N(0, I_16),
clean labels from a Bradley-Terry model P(A better) = sigmoid(beta u.(x_A - x_B))
with beta set so that the AUC of the true utility difference against the clean
labels is the cell's Bayes AUC (genuine ambiguity, no flips), then flips
exactly round(eps n) labels at random. The reward heads are then fit on the
*noisy* labels exactly as ``curate score`` fits them
(``curate.scores.reward.ensemble_margins``: out-of-fold, 3 split seeds x 5
folds, fixed L2), and every registered estimator runs on the mean margin.

Reported per estimator and cell: bias and RMSE of the rate against the
fraction actually flipped, coverage of its 90% interval (estimators that give
one), ECE against the flipped pairs (10 equal-width bins) of ``flip_prob`` (the
posterior averaged over the rate's profile likelihood; per replicate, and
pooled over the cell's replicates, which has less binning noise) and of
``flip_prob_conservative`` (at the interval's lower end where the rate is not
identified: what actions read), the bias of the rate's posterior mean where the
estimator gives one, the ECE of the Bayes flip posterior (true utility and
rate) on the same pairs, per replicate and pooled: the floor that binning noise sets at that n; the
default estimator fed the *true* utility difference instead of the OOF margin
(``true_utility``: perfect features, but the margin's scale still unknown, as
it is for any margin; what remains of its ECE is the price of not knowing the
scale); and the ensemble's measured OOF AUC on the clean labels. The summary checks the
bars of issue 15: pooled 90%-interval coverage over all cells and replicates
>= 0.85 (the share of cells whose own coverage is >= 0.85 is reported too),
and cell-mean ECE <= 0.05 where the Bayes AUC >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.special import expit

from curate.bench_noise import expected_calibration_error
from curate.scores import noise
from curate.scores.reward import FeatureSet, ensemble_margins, oriented_auc

EPS_GRID = (0.0, 0.05, 0.1, 0.2, 0.3)
AUC_GRID = (0.65, 0.7, 0.8, 0.9)
N_GRID = (1000, 10000)
DIM = 16
RESULTS = Path(__file__).resolve().parent / "results"


def bayes_auc_of_beta(beta: float, rng: np.random.Generator, n: int = 200_000) -> float:
    """AUC of the true utility difference against clean BT labels, for utility scale beta."""
    from sklearn.metrics import roc_auc_score

    t = beta * rng.normal(0.0, np.sqrt(2.0), n)  # u.(x_A - x_B) with |u| = 1 is N(0, 2)
    a_better = rng.random(n) < expit(t)
    return float(roc_auc_score(a_better, t))


def beta_for_auc(target: float, seed: int = 12345) -> float:
    """The beta whose Bayes AUC is ``target`` (bisection on a monotone map)."""
    low, high = 0.01, 20.0
    for _ in range(30):
        mid = 0.5 * (low + high)
        if bayes_auc_of_beta(mid, np.random.default_rng(seed)) < target:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def replicate(eps: float, beta: float, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    u = rng.normal(size=DIM)
    u /= np.linalg.norm(u)
    x_a, x_b = rng.normal(size=(n, DIM)), rng.normal(size=(n, DIM))
    a_better = rng.random(n) < expit(beta * (x_a - x_b) @ u)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.permutation(n)[: int(round(eps * n))]] = True
    a_chosen = a_better ^ flipped
    fs = FeatureSet("x", np.where(a_chosen[:, None], x_a, x_b), np.where(a_chosen[:, None], x_b, x_a))
    _, margins = ensemble_margins([fs], seeds=(0, 1, 2), folds=5)
    margin = margins.mean(axis=1)
    clean_margin = np.where(flipped, -margin, margin)  # the margin seen from the clean label's side
    # the Bayes flip posterior (true utility, true rate): its ECE on the same pairs is the floor that
    # finite-sample binning noise sets for any predictor
    t = beta * (fs.chosen - fs.rejected) @ u
    oracle = eps * expit(-t) / (eps * expit(-t) + (1 - eps) * expit(t))
    # the default fed the true utility difference: perfect features, but the margin's scale still unknown
    perfect = noise.get_estimator(noise.DEFAULT_ESTIMATOR)(t)
    out = {"true_rate": float(flipped.mean()), "oof_auc_clean": oriented_auc(clean_margin, seed=seed)["auc"],
           "ece_oracle": expected_calibration_error(oracle, flipped), "flipped": flipped, "oracle": oracle,
           "true_utility": {"rate": perfect.rate, "interval": [float(v) for v in perfect.interval],
                            "ece": expected_calibration_error(perfect.flip_prob, flipped)},
           "true_utility_flip_prob": perfect.flip_prob, "estimators": {}}
    for name, est in noise.estimate_all(margin, margins, seed=seed).items():
        row = {"rate": est.rate, "ece": expected_calibration_error(est.flip_prob, flipped), "flip_prob": est.flip_prob,
               "ece_conservative": expected_calibration_error(est.flip_prob_conservative, flipped),
               "rate_posterior_mean": est.details.get("rate_posterior_mean", est.rate)}
        if est.interval is not None:
            row.update(interval=[float(v) for v in est.interval], identifiable=est.identifiable,
                       rate_used=est.rate_used)
        out["estimators"][name] = row
    return out


def summarise_cell(reps: list[dict]) -> dict:
    truth = np.array([r["true_rate"] for r in reps])
    cell = {"oof_auc_clean": float(np.mean([r["oof_auc_clean"] for r in reps])),
            "ece_oracle": float(np.mean([r["ece_oracle"] for r in reps])), "estimators": {}}
    flipped = np.concatenate([r["flipped"] for r in reps])
    cell["ece_oracle_pooled"] = expected_calibration_error(np.concatenate([r["oracle"] for r in reps]), flipped)
    cell["true_utility"] = {
        "ece": float(np.mean([r["true_utility"]["ece"] for r in reps])),
        "ece_pooled": expected_calibration_error(np.concatenate([r["true_utility_flip_prob"] for r in reps]), flipped),
        "rmse": float(np.sqrt(np.mean([(r["true_utility"]["rate"] - r["true_rate"]) ** 2 for r in reps])))}
    for name in reps[0]["estimators"]:
        rows = [r["estimators"][name] for r in reps]
        err = np.array([row["rate"] for row in rows]) - truth
        post_err = np.array([row["rate_posterior_mean"] for row in rows]) - truth
        s = {"bias": float(err.mean()), "rmse": float(np.sqrt((err**2).mean())),
             "posterior_mean_rmse": float(np.sqrt((post_err**2).mean())),
             "ece": float(np.mean([row["ece"] for row in rows])),
             # all replicates' pairs in one ECE: calibration of the procedure, with 1/reps of the binning noise
             "ece_pooled": expected_calibration_error(np.concatenate([row["flip_prob"] for row in rows]), flipped),
             "ece_conservative": float(np.mean([row["ece_conservative"] for row in rows]))}
        if "interval" in rows[0]:
            covered = [lo <= t <= hi for (lo, hi), t in zip((row["interval"] for row in rows), truth)]
            s.update(coverage=float(np.mean(covered)),
                     mean_width=float(np.mean([hi - lo for lo, hi in (row["interval"] for row in rows)])),
                     identifiable_share=float(np.mean([bool(row["identifiable"]) for row in rows])))
        cell["estimators"][name] = s
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one replicate, n = 1k only")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    reps = 1 if args.quick else args.reps
    sizes = N_GRID[:1] if args.quick else N_GRID
    out_path = args.out or RESULTS / ("sim_noise_quick.json" if args.quick else "sim_noise.json")
    started = time.perf_counter()
    betas = {auc: beta_for_auc(auc) for auc in AUC_GRID}
    cells = []
    with threadpool_limits(limits=1):
        for n in sizes:
            for auc in AUC_GRID:
                for eps in EPS_GRID:
                    runs = [replicate(eps, betas[auc], n, seed=1000 * k + int(1e4 * eps) + int(1e3 * auc) + n)
                            for k in range(reps)]
                    cell = {"n": n, "bayes_auc": auc, "eps": eps, "beta": betas[auc], **summarise_cell(runs),
                            "replicates": [_without_arrays(r) for r in runs]}
                    d = cell["estimators"][noise.DEFAULT_ESTIMATOR]
                    print(f"n={n:>5} auc={auc:.2f} eps={eps:.2f} oof_auc={cell['oof_auc_clean']:.3f} "
                          f"{noise.DEFAULT_ESTIMATOR}: bias={d['bias']:+.3f} rmse={d['rmse']:.3f} "
                          f"cover={d['coverage']:.2f} width={d['mean_width']:.3f} ece={d['ece']:.3f} "
                          f"ece_conservative={d['ece_conservative']:.3f} ece_pooled={d['ece_pooled']:.3f} "
                          f"ece_oracle={cell['ece_oracle']:.3f} ece_pooled_true_utility="
                          f"{cell['true_utility']['ece_pooled']:.3f}", flush=True)
                    cells.append(cell)
    summary = {}
    for name in noise.ESTIMATORS:
        rows = [c["estimators"][name] for c in cells]
        s = {"mean_abs_bias": float(np.mean([abs(r["bias"]) for r in rows])),
             "mean_rmse": float(np.mean([r["rmse"] for r in rows])),
             "mean_ece_auc_ge_0.8": float(np.mean([r["ece"] for c, r in zip(cells, rows) if c["bayes_auc"] >= 0.8])),
             "max_ece_auc_ge_0.8": float(np.max([r["ece"] for c, r in zip(cells, rows) if c["bayes_auc"] >= 0.8])),
             "mean_posterior_mean_rmse": float(np.mean([r["posterior_mean_rmse"] for r in rows])),
             "max_ece_auc_ge_0.8_n_10k": float(np.max([r["ece"] for c, r in zip(cells, rows)
                                                      if c["bayes_auc"] >= 0.8 and c["n"] >= 10000] or [np.nan])),
             "max_ece_pooled_auc_ge_0.8": float(np.max([r["ece_pooled"] for c, r in zip(cells, rows)
                                                       if c["bayes_auc"] >= 0.8])),
             "max_ece_oracle_auc_ge_0.8": float(np.max([c["ece_oracle"] for c in cells if c["bayes_auc"] >= 0.8])),
             "mean_ece_conservative_auc_ge_0.8": float(np.mean([r["ece_conservative"] for c, r in zip(cells, rows)
                                                               if c["bayes_auc"] >= 0.8]))}
        if "coverage" in rows[0]:
            s["pooled_coverage"] = float(np.mean([r["coverage"] for r in rows]))
            s["cells_covered_share"] = float(np.mean([r["coverage"] >= 0.85 for r in rows]))
        summary[name] = s
    hard = [c for c in cells if c["bayes_auc"] >= 0.8]
    summary["reference_true_utility"] = {  # what the default reaches fed perfect features (scale unknown)
        "max_ece_pooled_auc_ge_0.8": float(np.max([c["true_utility"]["ece_pooled"] for c in hard])),
        "mean_ece_auc_ge_0.8": float(np.mean([c["true_utility"]["ece"] for c in hard])),
        "mean_rmse": float(np.mean([c["true_utility"]["rmse"] for c in cells]))}
    d = summary[noise.DEFAULT_ESTIMATOR]
    bars = {"pooled_coverage_ge_0.85": d["pooled_coverage"] >= 0.85,
            "mean_ece_le_0.05_where_auc_ge_0.8": d["mean_ece_auc_ge_0.8"] <= 0.05,
            "every_cell_ece_le_0.05_where_auc_ge_0.8": d["max_ece_auc_ge_0.8"] <= 0.05,
            "every_cell_pooled_ece_le_0.05_where_auc_ge_0.8": d["max_ece_pooled_auc_ge_0.8"] <= 0.05}
    result = {"default_estimator": noise.DEFAULT_ESTIMATOR, "replicates_per_cell": reps, "dim": DIM,
              "grid": {"eps": EPS_GRID, "bayes_auc": AUC_GRID, "n": sizes}, "heads": "ensemble_margins, 3 seeds x 5 folds",
              "summary": summary, "bars": bars, "seconds": round(time.perf_counter() - started, 1), "cells": cells}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    for name, s in summary.items():
        print(name, {k: round(v, 3) for k, v in s.items()})
    print(f"bars: {bars} -> {out_path} ({result['seconds']} s)")


def _without_arrays(run: dict) -> dict:
    return {k: v if k != "estimators" else {name: {f: x for f, x in row.items() if f != "flip_prob"}
                                             for name, row in v.items()}
            for k, v in run.items() if k not in ("flipped", "oracle", "true_utility_flip_prob")}


if __name__ == "__main__":
    main()
