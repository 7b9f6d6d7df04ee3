"""What the shipped reward priors add on held-out pairs (issue 15's ensemble bar, measured without its data).

    PYTHONPATH=.:benchmarks python benchmarks/exp_reward_prior.py --cache-dir /tmp/ens_cache \
        [--out benchmarks/results/exp_reward_prior.json]

Caches as in ``benchmarks/train_reward_prior.py``. The HH harmless sample is cut
into 3 disjoint random 512-pair subsets (the 512-pair held-out size; the
permutation of ``exp_ensemble_hh.py``). For each subset the harmless priors are
trained exactly as the shipped ones but on the other harmless pairs only; the
helpful priors are the shipped recipe on the helpful cache. The ensemble
``curate score`` builds (heads on policy states at layers 16/20/24, policy
log-probs, MiniLM reply embeddings, relevance, text statistics; grouped
5-fold x 3 seeds) is cross-fitted on the subset without priors, with the
harmless ones, the helpful ones, and all four (the ``priors`` feature set,
one block per prior). Then all harmless pairs at once, the harmless priors
cross-fitted over 4 grouped folds: OOF AUC and HH's flip rate with and without.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from curate.folds import pair_groups
from curate.scores.prior import PRIORS_SET, pair_reply_hashes
from curate.scores.reward import (FeatureSet, build_feature_sets, ensemble_heads, ensemble_quality, fold_ids,
                                  head_members, oriented_auc, reward_and_noise, scaled_margins)

from exp_ensemble_hh import SEEDS, layer_blocks, others, policy
from train_reward_prior import FEATURES, FILES, fit_prior, hh_feature_sets

RESULTS = Path(__file__).resolve().parent / "results"


def rows_of(sets, rows):
    return [FeatureSet(fs.name, fs.chosen[rows], fs.rejected[rows], fs.block_dims) for fs in sets]


def priors_set(rewards: dict[str, tuple[np.ndarray, np.ndarray]]) -> FeatureSet:
    return FeatureSet(PRIORS_SET, np.stack([c for c, _ in rewards.values()], 1),
                      np.stack([r for _, r in rewards.values()], 1), (1,) * len(rewards))


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
    base = {fs.name: fs for fs in build_feature_sets(harmless, device="cpu", cache_dir=args.cache_dir / "emb")}
    ensemble_sets = [layer_blocks([policy(cache, "mean", k) for k in (16, 20, 24)]), *others(cache, base)]
    groups, grouping = pair_groups(harmless)
    n = harmless.height
    h_hashes = pair_reply_hashes(harmless)
    nothing_seen = np.zeros(0, dtype=np.uint64)

    def oof(rows, extra=None):
        """OOF AUC of the ensemble on ``rows``; ``extra`` (a feature set over those rows only) joins it."""
        sets = [*rows_of(ensemble_sets, rows), *([extra] if extra is not None else [])]
        members = head_members(ensemble_heads(sets), seeds=SEEDS, groups=groups[rows])
        return ensemble_quality(members, scaled_margins(members), SEEDS)["auc"]

    def harmless_priors(train_rows, rows) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for kind, reads in FEATURES.items():
            prior = fit_prior(f"hh_harmless_{kind}", rows_of(h_sets, train_rows), reads,
                              seen=h_hashes[train_rows].ravel(), trained_on="other harmless pairs", sources={})
            test_sets = rows_of(h_sets, rows)
            assert prior.why_not(test_sets, {}, h_hashes[rows]) is None  # none of them seen
            out[prior.name] = prior.rewards(test_sets)
        return out

    helpful_fits = {f"hh_helpful_{kind}": fit_prior(f"hh_helpful_{kind}", f_sets, reads, seen=nothing_seen,
                                                    trained_on=f"{helpful.height} helpful-base pairs", sources={})
                    for kind, reads in FEATURES.items()}
    helpful_rewards = {name: prior.rewards(h_sets) for name, prior in helpful_fits.items()}  # all harmless rows
    out = {"pairs": {"harmless": n, "helpful": helpful.height}, "subset_size": 512, "fold_grouping": grouping,
           "seeds": list(SEEDS), "subsets": []}
    perm = np.random.default_rng(0).permutation(n)
    with threadpool_limits(limits=1):
        for i in range(args.subsets):
            rows = np.sort(perm[i * 512:(i + 1) * 512])
            rest = np.setdiff1d(np.arange(n), rows)
            own = harmless_priors(rest, rows)
            other = {k: (c[rows], r[rows]) for k, (c, r) in helpful_rewards.items()}
            alone = {k: float(np.mean([oriented_auc(c - r, seed=s)["auc"] for s in SEEDS]))
                     for k, (c, r) in {**own, **other}.items()}
            result = {"baseline": oof(rows), "prior_alone_auc": alone}
            for label, chosen in (("harmless_priors", own), ("helpful_priors", other), ("all_priors", {**own, **other})):
                result[label] = oof(rows, priors_set(chosen))
            out["subsets"].append(result)
            print(f"subset {i}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
                  + "; alone " + ", ".join(f"{k} {v:.3f}" for k, v in alone.items()), flush=True)
        out["all_pairs"] = all_pairs(ensemble_sets, harmless_priors, helpful_rewards, groups, grouping)
    keys = ("baseline", "harmless_priors", "helpful_priors", "all_priors")
    out["summary"] = {k: {"mean": float(np.mean([s[k] for s in out["subsets"]])),
                          "min": float(np.min([s[k] for s in out["subsets"]]))} for k in keys}
    out["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    for k, v in out["summary"].items():
        print(f"{k:<18} mean {v['mean']:.4f} min {v['min']:.4f}")
    print(f"-> {args.out}")


def all_pairs(ensemble_sets, harmless_priors, helpful_rewards, groups, grouping, folds: int = 4) -> dict:
    """Every harmless pair: the harmless priors cross-fitted over grouped folds, then the ensemble and the
    default noise estimate without and with all four priors."""
    n = len(groups)
    fold = fold_ids(n, folds, 0, groups)
    own: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k in range(folds):
        rows = np.flatnonzero(fold == k)
        for name, (c, r) in harmless_priors(np.flatnonzero(fold != k), rows).items():
            own.setdefault(name, (np.zeros(n), np.zeros(n)))
            own[name][0][rows], own[name][1][rows] = c, r
    out: dict = {"prior_folds": folds}
    with_priors = [*ensemble_sets, priors_set({**own, **helpful_rewards})]
    for label, sets in (("without_priors", ensemble_sets), ("with_priors", with_priors)):
        _, info = reward_and_noise(sets, groups=groups, grouping=grouping)
        noise = info["noise"]
        out[label] = {"oof_auc": info["reward"]["oof_auc"],
                      **{k: noise[k] for k in ("flip_rate", "flip_rate_interval", "identifiable",
                                               "flip_rate_posterior_mean", "conservative_rate", "summary")}}
        print(f"all {n} pairs, {label}: OOF AUC {out[label]['oof_auc']:.4f}; {noise['summary']}", flush=True)
    return out


if __name__ == "__main__":
    main()
