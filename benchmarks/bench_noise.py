"""Speed of the reward heads and noise estimators on the 1,800 shared HH-RLHF pairs.

    .venv/bin/python benchmarks/bench_noise.py [--limit 1800] [--run RUN] [--cache-dir DIR]

Feature sets: MiniLM reply embeddings (``curate.embeddings``, cached in
``--cache-dir``; their time is reported separately, it is the features
engineer's cost), text statistics, and the policy's pooled states when
``--run`` points at a run directory scored with ``curate score --scores ches``.

Measured in this one run, on the same features and folds:

- baseline: scikit-learn ``LogisticRegression`` (lbfgs, same L2, both
  orientations so it sees two classes) as each cross-fitted head;
- ours: ``curate.scores.reward.ensemble_margins`` (scipy L-BFGS on the
  Bradley-Terry objective with an analytic gradient), 3 split seeds x 5 folds;
- the noise estimators (``estimate_all``: EM, anchor, mixture, cleanlab, margin);
- the whole reward+noise step (``reward_and_noise``) without embeddings.

Each step reports wall seconds and process CPU seconds (all threads): on a
shared machine the CPU seconds are the figure that does not depend on the
other jobs. The last line is
``heads_speedup_vs_sklearn=X reward_noise_cpu_seconds=Y`` (ratios of CPU time).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from curate.data import load_pairs
from curate.rundir import RunDir
from curate.scores import noise
from curate.scores.reward import (
    DEFAULT_L2,
    build_feature_sets,
    ensemble_heads,
    ensemble_margins,
    fold_ids,
    reward_and_noise,
)

HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-test-dev.jsonl.gz"


def sklearn_heads(heads, seeds, folds, l2):
    """The baseline: the same cross-fitting with scikit-learn's logistic regression as the head."""
    from sklearn.linear_model import LogisticRegression

    for seed in seeds:
        fold = fold_ids(len(heads[0].chosen), folds, seed)
        for fs in heads:
            for k in range(folds):
                train = fold != k
                replies = np.concatenate([fs.chosen[train], fs.rejected[train]])
                std = (replies.std(axis=0) + 1e-8) * np.sqrt(fs.dim)
                diff = (fs.chosen[train] - fs.rejected[train]) / std
                x = np.concatenate([diff, -diff])
                y = np.r_[np.ones(len(diff)), np.zeros(len(diff))]
                LogisticRegression(C=1 / (2 * l2), fit_intercept=False, max_iter=1000).fit(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--run", type=str, default=None, help="run dir with pooled.npz from the CHES pass")
    parser.add_argument("--cache-dir", type=str, default=None)
    parser.add_argument("--device", type=str, default="cpu")
    args = parser.parse_args()

    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="curate-emb-")
    if args.run:
        run = RunDir(args.run)
        pairs = run.pairs()
    else:
        run = None
        pairs = load_pairs(str(HH), limit=args.limit).pairs
    seeds, folds, l2 = (0, 1, 2), 5, DEFAULT_L2

    t = time.perf_counter()
    feature_sets = build_feature_sets(pairs, run=run, device=args.device, cache_dir=cache_dir)
    t_features = time.perf_counter() - t
    heads = ensemble_heads(feature_sets)
    print(f"pairs={pairs.height} feature_sets={ {fs.name: fs.dim for fs in feature_sets} } "
          f"heads={[h.name for h in heads]} features_s={t_features:.2f}")

    noise.estimate_all(np.linspace(-1, 1, 50))  # import cleanlab and friends outside the timings

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    from threadpoolctl import threadpool_limits

    def baseline():
        with threadpool_limits(limits=1):  # the same BLAS setting as ours
            sklearn_heads(heads, seeds, folds, l2)

    _, sk_wall, sk_cpu = timed(baseline)
    (members, margins), h_wall, h_cpu = timed(lambda: ensemble_margins(feature_sets, seeds=seeds, folds=folds, l2=l2))
    estimates, e_wall, e_cpu = timed(lambda: noise.estimate_all(margins.mean(axis=1), margins))
    (_, info), s_wall, s_cpu = timed(lambda: reward_and_noise(feature_sets, seeds=seeds, folds=folds, l2=l2))

    n_fits = len(heads) * len(seeds) * folds
    print(f"baseline sklearn heads: wall {sk_wall:.2f} s cpu {sk_cpu:.2f} s ({n_fits} fits)")
    print(f"curate heads:           wall {h_wall:.2f} s cpu {h_cpu:.2f} s  cpu ratio {sk_cpu / h_cpu:.2f}x")
    print(f"noise estimators:       wall {e_wall:.2f} s cpu {e_cpu:.2f} s  rates "
          + " ".join(f"{k}={e.rate:.3f}" for k, e in estimates.items()))
    print(f"reward+noise step:      wall {s_wall:.2f} s cpu {s_cpu:.2f} s  oof_auc={info['reward']['oof_auc']:.4f} "
          f"auc_by_feature_set={ {k: round(v, 4) for k, v in info['reward']['auc_by_feature_set'].items()} }")
    print(f"heads_speedup_vs_sklearn={sk_cpu / h_cpu:.2f} reward_noise_cpu_seconds={s_cpu:.2f}")


if __name__ == "__main__":
    main()
