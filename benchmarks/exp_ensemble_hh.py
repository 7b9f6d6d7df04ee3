"""Which reward-ensemble recipe? Candidates scored the way the graders score: OOF AUC within 512-pair subsets.

    PYTHONPATH=. python benchmarks/exp_ensemble_hh.py --cache /tmp/ens_cache/harmless.npz \
        [--data harmless-base-test-dev.jsonl.gz] [--emb-cache /tmp/ens_cache/emb] [--candidates a,b]
        [--out benchmarks/results/exp_ensemble_hh.json]

``--cache`` is the output of ``benchmarks/cache_policy_layers.py`` on the same
file (the policy's mean and last-token reply states at several layers, reply
log-probs); the MiniLM reply embeddings, relevance and text statistics are added
as in ``curate score --scores reward``. Each candidate is a list of feature
sets plus an L2 and a head layout, cross-fitted as ``curate score`` does (folds
grouped by shared prompt / reply, 3 split seeds x 5 folds, members averaged per
seed, AUC over randomly oriented pairs, averaged over seeds). It is scored within
each of ``--subsets`` disjoint random subsets of ``--subset-size`` pairs (heads
trained on ~410 pairs per fold, as on a 512-pair held-out set) and on all pairs;
the JSON keeps every number, the table prints mean / min over subsets and all.
``layers_16_20_24_blocks`` is what ``curate score`` now does (``curate.lm.PROBE_DEPTHS``);
``baseline_l2_4`` the previous default. Numbers: docs/results.md (issue 15).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from curate.data.load import load_pairs
from curate.folds import pair_groups
from curate.scores.reward import (FeatureSet, build_feature_sets, concat_feature_sets, ensemble_heads,
                                  ensemble_quality, head_members, scaled_margins)

HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf"
RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)


def policy(cache, pooling: str, layer: int, name: str | None = None) -> FeatureSet:
    return FeatureSet(name or f"policy_{pooling}{layer}", cache[f"{pooling}_{layer}_chosen"],
                      cache[f"{pooling}_{layer}_rejected"])


def others(cache, base: dict[str, FeatureSet], drop=()) -> list[FeatureSet]:
    logp = FeatureSet("policy_logp", np.stack([cache["logp_chosen"], cache["logp_chosen"] / cache["len_chosen"]], 1),
                      np.stack([cache["logp_rejected"], cache["logp_rejected"] / cache["len_rejected"]], 1))
    return [fs for fs in (logp, *base.values()) if fs.name not in drop]


def candidates(cache, base) -> dict[str, dict]:
    """name -> {"sets": feature sets, "l2": float, "heads": "loo" (all + leave-one-out) | "concat" | "separate"}."""
    rest = others(cache, base)
    out = {f"baseline_l2_{v:g}": {"sets": [policy(cache, "mean", 20, "policy"), *rest], "l2": v, "heads": "loo"}
           for v in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)}
    out["baseline_nested_l2"] = {"sets": [policy(cache, "mean", 20, "policy"), *rest], "l2": (2.0, 4.0, 16.0, 64.0),
                                 "heads": "loo"}
    out["policy_alone"] = {"sets": [policy(cache, "mean", 20, "policy")], "l2": 4.0, "heads": "loo"}
    out["baseline_concat_only"] = {"sets": [policy(cache, "mean", 20, "policy"), *rest], "l2": 4.0, "heads": "concat"}
    out["baseline_separate"] = {"sets": [policy(cache, "mean", 20, "policy"), *rest], "l2": 4.0, "heads": "separate"}
    for k in (16, 24):
        out[f"mean{k}"] = {"sets": [policy(cache, "mean", k, "policy"), *rest], "l2": 4.0, "heads": "loo"}
    out["mean20+last20"] = {"sets": [policy(cache, "mean", 20), policy(cache, "last", 20), *rest], "l2": 4.0,
                            "heads": "loo"}
    for layers in ((16, 20, 24), (12, 16, 20, 24), (12, 20, 28), (8, 12, 16, 20, 24, 28)):
        name = "layers_" + "_".join(map(str, layers))
        sets = [policy(cache, "mean", k) for k in layers]
        out[name] = {"sets": [*sets, *rest], "l2": 4.0, "heads": "loo"}
        # the layers as one block (unit total variance together): the head weighs them against the other features
        out[name + "_oneblock"] = {"sets": [concat_one_block(sets, "policy"), *rest], "l2": 4.0, "heads": "loo"}
        # one "policy" set whose layers are blocks of their own (what a multi-layer pooled.npz would give)
        out[name + "_blocks"] = {"sets": [layer_blocks(sets), *rest], "l2": 4.0, "heads": "loo"}
        out[name + "_avg"] = {"sets": [average_layers(sets), *rest], "l2": 4.0, "heads": "loo"}
    out["layers_16_20_24_blocks_l2_2"] = {**out["layers_16_20_24_blocks"], "l2": 2.0}
    out["drop_relevance_logp"] = {"sets": [policy(cache, "mean", 20, "policy"),
                                           *others(cache, base, drop=("relevance", "policy_logp"))],
                                  "l2": 4.0, "heads": "loo"}
    return out


def concat_one_block(sets: list[FeatureSet], name: str) -> FeatureSet:
    return FeatureSet(name, np.concatenate([s.chosen for s in sets], 1), np.concatenate([s.rejected for s in sets], 1))


def layer_blocks(sets: list[FeatureSet]) -> FeatureSet:
    one = concat_one_block(sets, "policy")
    return FeatureSet("policy", one.chosen, one.rejected, tuple(s.dim for s in sets))


def average_layers(sets: list[FeatureSet]) -> FeatureSet:
    return FeatureSet("policy", np.mean([s.chosen for s in sets], 0), np.mean([s.rejected for s in sets], 0))


def heads_of(spec) -> list[FeatureSet]:
    if spec["heads"] == "concat":
        return [concat_feature_sets(spec["sets"])]
    if spec["heads"] == "separate":
        return list(spec["sets"])
    return ensemble_heads(spec["sets"])


def oof_auc(spec, rows: np.ndarray, groups: np.ndarray) -> float:
    heads = [FeatureSet(h.name, h.chosen[rows], h.rejected[rows], h.block_dims) for h in heads_of(spec)]
    members = head_members(heads, seeds=SEEDS, l2=spec["l2"], groups=groups[rows])
    return ensemble_quality(members, scaled_margins(members), SEEDS)["auc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--data", default="harmless-base-test-dev.jsonl.gz")
    parser.add_argument("--emb-cache", type=str, default=None)
    parser.add_argument("--subsets", type=int, default=3)
    parser.add_argument("--subset-size", type=int, default=512)
    parser.add_argument("--candidates", type=str, default=None, help="comma-separated subset of the names")
    parser.add_argument("--no-all", action="store_true", help="skip the all-pairs column")
    parser.add_argument("--noise", type=str, default=None,
                        help="a candidate whose noise estimate on all cached pairs goes in the JSON (HH's flip rate)")
    parser.add_argument("--out", type=Path, default=RESULTS / "exp_ensemble_hh.json")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    with np.load(args.cache, allow_pickle=False) as z:
        cache = {k: z[k] for k in z.files}
    pairs = load_pairs(str(HH / args.data)).pairs
    index = {p: i for i, p in enumerate(pairs["pair_id"].to_list())}
    pairs = pairs[[index[str(p)] for p in cache["pair_id"]]]
    base = {fs.name: fs for fs in build_feature_sets(pairs, device="cpu", cache_dir=args.emb_cache)}
    groups, grouping = pair_groups(pairs)
    n = pairs.height
    perm = np.random.default_rng(0).permutation(n)
    subsets = [np.sort(perm[i * args.subset_size:(i + 1) * args.subset_size]) for i in range(args.subsets)]
    specs = candidates(cache, base)
    names = args.candidates.split(",") if args.candidates else list(specs)
    out = {"data": args.data, "pairs": n, "subset_size": args.subset_size, "subsets": args.subsets,
           "fold_grouping": grouping, "seeds": list(SEEDS), "candidates": {}}
    size = args.subset_size
    print(f"{'candidate':<34}{f'{size} mean':>9}{f'{size} min':>9}{'all':>8}", flush=True)
    with threadpool_limits(limits=1):
        for name in names:
            spec = specs[name]
            aucs = [oof_auc(spec, rows, groups) for rows in subsets]
            all_auc = None if args.no_all else oof_auc(spec, np.arange(n), groups)
            out["candidates"][name] = {
                "subset_aucs": aucs, "subset_mean": float(np.mean(aucs)), "subset_min": float(np.min(aucs)),
                "all": all_auc, "l2": spec["l2"] if np.isscalar(spec["l2"]) else list(spec["l2"]), "heads": spec["heads"],
                "feature_sets": {fs.name: fs.dim for fs in spec["sets"]}}
            print(f"{name:<34}{np.mean(aucs):>9.4f}{np.min(aucs):>9.4f}"
                  f"{'' if all_auc is None else format(all_auc, '>8.4f')}", flush=True)
        if args.noise:
            from curate.scores.reward import reward_and_noise

            columns, info = reward_and_noise(specs[args.noise]["sets"], groups=groups, grouping=grouping)
            keys = ("flip_rate", "flip_rate_interval", "identifiable", "flip_rate_posterior_mean", "conservative_rate",
                    "summary")
            out["noise"] = {"candidate": args.noise, "pairs": n, "oof_auc": info["reward"]["oof_auc"],
                            **{k: info["noise"][k] for k in keys},
                            "estimators": {k: v["rate"] for k, v in info["noise"]["estimators"].items()},
                            "mean_flip_prob": float(np.mean(columns["flip_prob"]))}
            print(info["noise"]["summary"], flush=True)
    out["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
