"""Leak-free fold groups: connected components over shared prompts and replies; pure noise stays at chance."""

import numpy as np
import pytest

from curate.errors import CurateError
from curate.folds import MAX_GROUP_SHARE, connected_groups, grouped_fold_ids, pair_groups
from curate.scores.reward import FeatureSet, head_members, oriented_auc


def test_connected_groups_by_hand():
    # 0-1 share a prompt, 1-2 share a reply (in swapped roles), 3 is alone, 4-5 share a chosen reply
    prompts = ["p", "p", "q", "r", "s", "t"]
    chosen = ["a", "b", "x", "d", "e", "e"]
    rejected = ["c", "x", "y", "f", "g", "h"]
    groups = connected_groups(prompts, chosen, rejected)
    assert groups[0] == groups[1] == groups[2]
    assert groups[4] == groups[5]
    assert len({groups[0], groups[3], groups[4]}) == 3


def test_grouped_folds_keep_groups_whole_and_balanced():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 1000)
    fold = grouped_fold_ids(groups, 5, seed=1)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1
    counts = np.bincount(fold, minlength=5)
    assert counts.max() - counts.min() <= np.bincount(groups).max()
    assert (grouped_fold_ids(groups, 5, seed=1) == fold).all()
    with pytest.raises(CurateError, match="fewer than 5 folds"):
        grouped_fold_ids(np.zeros(10, dtype=int), 5, seed=0)


def ultrafeedback_shaped(n_prompts=150, replies=8, dim=32, seed=0):
    """Each prompt has several replies; one (at random: labels are pure noise) is chosen against each of the others."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_prompts, replies, dim))
    prompts, chosen, rejected, xc, xr = [], [], [], [], []
    for p in range(n_prompts):
        best = rng.integers(replies)
        for other in range(replies):
            if other != best:
                prompts.append(f"prompt {p}")
                chosen.append(f"reply {p}-{best}")
                rejected.append(f"reply {p}-{other}")
                xc.append(feats[p, best])
                xr.append(feats[p, other])
    return prompts, chosen, rejected, FeatureSet("emb", np.array(xc), np.array(xr))


def test_pure_noise_labels_give_chance_oof_auc_with_grouped_folds_only():
    prompts, chosen, rejected, fs = ultrafeedback_shaped()
    groups = connected_groups(prompts, chosen, rejected)
    aucs = {}
    for name, g in (("per_pair", None), ("grouped", groups)):
        members = head_members([fs], seeds=(0, 1, 2), folds=5, groups=g)
        aucs[name] = float(np.mean([oriented_auc(m.margin, seed=k)["auc"] for k, m in enumerate(members)]))
    assert aucs["per_pair"] > 0.58  # the shared chosen reply leaks across per-pair folds
    assert abs(aucs["grouped"] - 0.5) < 0.04


def test_pair_groups_use_prompt_id_and_fall_back_to_prompts_when_replies_chain_everything():
    import polars as pl

    table = pl.DataFrame({
        "prompt_id": ["a", "a", "b", "c", "d", "e", "f", "g", "h", "i"],
        "prompt": [[{"role": "user", "content": str(i)}] for i in range(10)],
        "chosen": [f"c{i}" for i in range(10)],
        "rejected": [f"r{i}" for i in range(10)],
    })
    groups, how = pair_groups(table)
    assert groups[0] == groups[1] and len(set(groups)) == 9  # prompt_id links pairs 0 and 1
    assert how.startswith("connected components")
    chained = table.with_columns(rejected=pl.lit("I'm sorry, I can't help with that."))
    groups, how = pair_groups(chained)
    assert how.startswith("grouped by prompt only") and len(set(groups)) == 9
    assert MAX_GROUP_SHARE == 0.2
