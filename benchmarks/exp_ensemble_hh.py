"""Reward-ensemble settings chosen on a selection slice, then the OOF AUC on HH harmless with them fixed.

    PYTHONPATH=. .venv/bin/python benchmarks/exp_ensemble_hh.py --run /tmp/noise_hh [--select 600]
        [--cache-dir /tmp/noise_emb] [--out benchmarks/results/exp_ensemble_hh.json]

``--run`` is a run directory of ``curate score --scores ches,logps`` on
``harmless-base-test-dev.jsonl.gz`` (policy probe states and log-probs), to
which the MiniLM reply embeddings, relevance and text statistics are added as
in ``curate score --scores reward``. Candidates (all with folds grouped by
shared prompt / reply, 3 split seeds x 5 folds):

- ``l2_<v>``: one L2 for every head, v in ``L2_GRID`` (``l2_4`` is ``DEFAULT_L2``);
- ``nested_l2``: each outer training set picks its L2 from ``L2_GRID`` by
  inner 3-fold CV (nested: the scored pairs never take part; 13x the fits).

The candidate with the best OOF AUC on the first ``--select`` pairs is chosen
on those pairs alone; then its OOF AUC is reported on the remaining pairs and
on all of them (settings fixed), with the default noise estimate on all pairs
(HH's flip rate with its 90% interval).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from curate.folds import pair_groups
from curate.rundir import RunDir
from curate.scores.reward import FeatureSet, build_feature_sets, reward_and_noise

L2_GRID = (1.0, 4.0, 16.0, 64.0)
CANDIDATES = {**{f"l2_{v:g}": v for v in L2_GRID}, "nested_l2": L2_GRID}
RESULTS = Path(__file__).resolve().parent / "results"


def subset(feature_sets, rows):
    return [FeatureSet(fs.name, fs.chosen[rows], fs.rejected[rows], fs.block_dims) for fs in feature_sets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--select", type=int, default=600)
    parser.add_argument("--cache-dir", type=str, default=None)
    parser.add_argument("--candidates", type=str, default=",".join(CANDIDATES), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=RESULTS / "exp_ensemble_hh.json")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    run = RunDir(args.run)
    pairs = run.pairs()
    feature_sets = build_feature_sets(pairs, run=run, device="cpu", cache_dir=args.cache_dir)
    groups, grouping = pair_groups(pairs)
    n = pairs.height
    select = np.arange(n) < args.select
    out = {"run": args.run, "pairs": n, "select_pairs": int(select.sum()), "fold_grouping": grouping,
           "feature_sets": {fs.name: fs.dim for fs in feature_sets}, "candidates": {}}
    def evaluate(l2, rows):
        _, info = reward_and_noise(subset(feature_sets, rows), l2=l2, groups=groups[rows])
        return info

    with threadpool_limits(limits=1):
        for name in args.candidates.split(","):
            info = evaluate(CANDIDATES[name], select)
            out["candidates"][name] = {"oof_auc_selection": info["reward"]["oof_auc"]}
            print(name, "selection", round(info["reward"]["oof_auc"], 4), flush=True)
        chosen = max(out["candidates"], key=lambda k: out["candidates"][k]["oof_auc_selection"])
        out["chosen_on_selection"] = chosen
        for part, rows in (("rest", ~select), ("all", np.ones(n, dtype=bool))):
            info = evaluate(CANDIDATES[chosen], rows)
            row = out["candidates"][chosen]
            row[f"oof_auc_{part}"] = info["reward"]["oof_auc"]
            print(chosen, part, round(info["reward"]["oof_auc"], 4), flush=True)
            if part == "all":
                row["auc_by_feature_set"] = info["reward"]["auc_by_feature_set"]
                row["noise"] = {k: info["noise"][k] for k in ("flip_rate", "flip_rate_interval", "identifiable",
                                                             "conservative_rate", "summary")}
                row["noise_estimators"] = {k: v["rate"] for k, v in info["noise"]["estimators"].items()}
    out["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk.startswith("oof") or kk == "noise"}
                      for k, v in out["candidates"].items()}, indent=1))
    print(f"chosen on the first {args.select} pairs: {out['chosen_on_selection']} -> {args.out}")


if __name__ == "__main__":
    main()
