"""Leak-free cross-validation groups for preference pairs.

Two pairs that share a prompt, or share a reply text, must fall in the same
fold: otherwise a head can memorise a reply (or a prompt's style) in the
training folds and "predict" it out of fold. UltraFeedback-style data, where
one best reply is the chosen side of several pairs, reaches an out-of-fold AUC
well above chance on pure-noise labels with per-pair folds.

Groups are the connected components of the graph whose nodes are pairs and
whose edges join pairs with the same prompt key (the ``prompt_id`` column when
the data carry it, else a hash of the prompt messages) or a common reply text.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

from curate.errors import CurateError


def prompt_key(prompt: Any) -> str:
    """A stable key of a prompt (a list of chat messages or a string): a hash of its JSON."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def connected_groups(prompt_keys: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> np.ndarray:
    """Component index per pair: pairs linked by a shared prompt key or a shared reply text share an index."""
    n = len(prompt_keys)
    if not len(chosen) == len(rejected) == n:
        raise CurateError("prompt keys, chosen and rejected replies must have one entry per pair")
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[tuple[str, str], int] = {}
    for i in range(n):
        for key in (("p", prompt_keys[i]), ("r", chosen[i]), ("r", rejected[i])):
            j = first_seen.setdefault(key, i)
            if j != i:
                parent[root(i)] = root(j)
    roots = [root(i) for i in range(n)]
    _, index = np.unique(roots, return_inverse=True)
    return index.astype(np.int64)


# A group larger than this share of the pairs cannot sit in one of 5 folds without unbalancing them.
MAX_GROUP_SHARE = 0.2


def pair_groups(pairs, *, max_share: float = MAX_GROUP_SHARE) -> tuple[np.ndarray, str]:
    """Fold groups of a pair table and how they were formed.

    Prompt key: ``prompt_id`` when present, else the prompt's hash. Pairs are
    linked by a shared prompt or a shared reply text (:func:`connected_groups`).
    Generic replies repeated across many prompts ("I'm sorry, I can't help")
    can chain most of a dataset into one component; when the largest holds
    more than ``max_share`` of the pairs, replies are ignored and the groups
    are the prompts alone (said in the returned description).
    """
    if "prompt_id" in pairs.columns and pairs["prompt_id"].null_count() == 0:
        keys = [str(k) for k in pairs["prompt_id"].to_list()]
    else:
        keys = [prompt_key(p) for p in pairs["prompt"].to_list()]
    chosen, rejected = pairs["chosen"].to_list(), pairs["rejected"].to_list()
    groups = connected_groups(keys, chosen, rejected)
    largest = np.bincount(groups).max() if len(groups) else 0
    if largest <= max_share * len(groups):
        return groups, "connected components of pairs sharing a prompt or a reply"
    by_prompt = connected_groups(keys, [f"c{i}" for i in range(len(keys))], [f"r{i}" for i in range(len(keys))])
    return by_prompt, (f"grouped by prompt only: shared replies chain {largest} of {len(groups)} pairs into one "
                       "component, too many for balanced folds")


def grouped_fold_ids(groups: Sequence[int], folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) per pair; a group never spans two folds.

    Groups are visited largest first (ties in a seeded random order) and each
    goes to the fold with the fewest pairs so far, so folds stay balanced when
    groups differ in size. With every group a single pair this is a balanced
    random split.
    """
    groups = np.asarray(groups)
    unique, index, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if len(unique) < folds:
        raise CurateError(
            f"only {len(unique)} groups of pairs that share no prompt or reply, fewer than {folds} folds; "
            "use fewer --folds or more varied pairs"
        )
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(unique)), -sizes))
    load = np.zeros(folds, dtype=np.int64)
    fold_of_group = np.empty(len(unique), dtype=np.int64)
    for g in order:
        k = int(np.argmin(load + rng.random(folds) * 1e-3))  # random among equally loaded folds
        fold_of_group[g] = k
        load[k] += sizes[g]
    return fold_of_group[index]
