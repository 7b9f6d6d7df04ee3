"""What the shipped reward priors add on held-out pairs (issue 15's ensemble bar, measured without its data).

    PYTHONPATH=. python benchmarks/exp_reward_prior.py --cache-dir /tmp/ens_cache \
        [--out benchmarks/results/exp_reward_prior.json]

Caches as in ``benchmarks/train_reward_prior.py``. The HH harmless sample is cut
into 3 disjoint random 512-pair subsets (the 512-pair held-out size; the
permutation of ``exp_ensemble_hh.py``). For each subset the priors are trained
exactly as the shipped ones, on every other pair (helpful-base and the rest of
harmless; and, as a transfer check, on helpful-base alone), and the ensemble
``curate score`` builds (heads on policy states at layers 16/20/24, policy
log-probs, MiniLM reply embeddings, relevance, text statistics; grouped
5-fold x 3 seeds) is cross-fitted on the subset with and without the prior
feature sets. Reports OOF AUC per subset, mean and min.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from curate.folds import pair_groups
from curate.scores.prior import pair_reply_hashes
from curate.scores.reward import (FeatureSet, ensemble_heads, ensemble_quality, head_members, oriented_auc,
                                  scaled_margins)

from exp_ensemble_hh import SEEDS, layer_blocks, others, policy
from train_reward_prior import FILES, PRIORS, fit_prior, hh_feature_sets, stack

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ens_cache"))
    parser.add_argument("--subsets", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "exp_reward_prior.json")
    args = parser.parse_args()
    started = time.perf_counter()
    (harmless, h_sets), (helpful, f_sets) = [hh_feature_sets(name, args.cache_dir) for name in FILES]
    with np.load(args.cache_dir / "harmless.npz", allow_pickle=False) as z:
        cache = {k: z[k] for k in z.files}
    from curate.scores.reward import build_feature_sets

    base = {fs.name: fs for fs in build_feature_sets(harmless, device="cpu", cache_dir=args.cache_dir / "emb")}
    ensemble_sets = [layer_blocks([policy(cache, "mean", k) for k in (16, 20, 24)]), *others(cache, base)]
    groups, grouping = pair_groups(harmless)
    n = harmless.height
    perm = np.random.default_rng(0).permutation(n)
    subsets = [np.sort(perm[i * 512:(i + 1) * 512]) for i in range(args.subsets)]
    h_hashes, f_hashes = pair_reply_hashes(harmless), pair_reply_hashes(helpful)

    def oof(rows, extra=()):
        sets = [FeatureSet(fs.name, fs.chosen[rows], fs.rejected[rows], fs.block_dims)
                for fs in (*ensemble_sets, *extra)]
        members = head_members(ensemble_heads(sets), seeds=SEEDS, groups=groups[rows])
        return ensemble_quality(members, scaled_margins(members), SEEDS)["auc"]

    out = {"pairs": {"harmless": n, "helpful": helpful.height}, "subset_size": 512, "fold_grouping": grouping,
           "seeds": list(SEEDS), "subsets": []}
    with threadpool_limits(limits=1):
        for i, rows in enumerate(subsets):
            rest = np.setdiff1d(np.arange(n), rows)
            result = {"baseline": oof(rows)}
            print(f"subset {i}: baseline {result['baseline']:.4f}", flush=True)
            for source, train_rows in (("helpful+other_harmless", rest), ("helpful_only", rest[:0])):
                train_sets = stack([f_sets, [FeatureSet(fs.name, fs.chosen[train_rows], fs.rejected[train_rows],
                                                        fs.block_dims) for fs in h_sets]])
                seen = np.concatenate([f_hashes.ravel(), h_hashes[train_rows].ravel()])
                test_sets = [FeatureSet(fs.name, fs.chosen[rows], fs.rejected[rows], fs.block_dims) for fs in h_sets]
                priors = {}
                for name, reads in PRIORS.items():
                    prior = fit_prior(name, train_sets, reads, seen=seen, trained_on=source, sources={})
                    assert prior.why_not(test_sets, {}, h_hashes[rows]) is None  # no training reply in the subset
                    rc, rr = prior.rewards(test_sets)
                    priors[name] = FeatureSet(f"prior_{name}", rc, rr)
                    alone = float(np.mean([oriented_auc(rc - rr, seed=s)["auc"] for s in SEEDS]))
                    result[f"{source}/{name}"] = {"prior_alone": alone, "l2": prior.l2,
                                                  "ensemble": oof(rows,
                                                                  [_full(priors[name], rows, n)])}
                    print(f"  {source}/{name}: alone {alone:.4f}, ensemble {result[f'{source}/{name}']['ensemble']:.4f}",
                          flush=True)
                both = oof(rows, [_full(p, rows, n) for p in priors.values()])
                result[f"{source}/both"] = {"ensemble": both}
                print(f"  {source}/both: ensemble {both:.4f}", flush=True)
            out["subsets"].append(result)
    keys = [k for k in out["subsets"][0]]
    out["summary"] = {k: {"mean": float(np.mean([_auc(s[k]) for s in out["subsets"]])),
                          "min": float(np.min([_auc(s[k]) for s in out["subsets"]]))} for k in keys}
    out["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    for k, v in out["summary"].items():
        print(f"{k:<40} mean {v['mean']:.4f} min {v['min']:.4f}")
    print(f"-> {args.out}")


def _full(fs: FeatureSet, rows: np.ndarray, n: int) -> FeatureSet:
    """A subset's prior rewards placed back at its rows of the whole table (oof() slices them out again)."""
    chosen, rejected = np.zeros(n), np.zeros(n)
    chosen[rows], rejected[rows] = fs.chosen[:, 0], fs.rejected[:, 0]
    return FeatureSet(fs.name, chosen, rejected)


def _auc(entry) -> float:
    return entry if isinstance(entry, float) else entry["ensemble"]


if __name__ == "__main__":
    main()
