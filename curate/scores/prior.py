"""Reward priors: Bradley-Terry probes trained once on public preference data and shipped with curate.

A prior reads feature sets the ensemble already builds (the bundled policy's
probe-layer reply states, the MiniLM reply embeddings) and gives every reply
a reward, w . (features - mean). The ensemble's heads read every prior that
applies as one feature set, ``priors``, one 1-dim block per prior, and learn
from the user's labels how much, and with which sign, each counts: HH's
harmless and helpful annotators reward opposite things (priors trained on
helpful-base rank harmless pairs at AUC 0.31-0.38), so each subset has its own
prior. The heads stay out-of-fold, and no prior saw the user's labels.

A prior is used only when its inputs are the same features (names, widths,
and the model that made them: the policy's weights file, the embedder) and
none of the scored pairs' replies were in its training data, so an
out-of-fold AUC stays honest.
``benchmarks/train_reward_prior.py`` writes the shipped files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

PRIOR_DIR = Path(__file__).resolve().parent.parent / "priors"


def reply_hashes(prompts: Sequence[Sequence[Mapping[str, str]]], replies: Sequence[str]) -> np.ndarray:
    """uint64 hash of each (prompt, reply): what "this reply was in the training data" is checked on."""
    from curate.data.schema import make_prompt_id

    out = np.empty(len(replies), dtype=np.uint64)
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        canonical = json.dumps([make_prompt_id(prompt), reply], ensure_ascii=False)
        out[i] = int.from_bytes(hashlib.sha256(canonical.encode("utf-8")).digest()[:8], "little")
    return out


def pair_reply_hashes(pairs) -> np.ndarray:
    """[n, 2] hashes of every pair's chosen and rejected reply."""
    prompts = pairs["prompt"].to_list()
    return np.stack([reply_hashes(prompts, pairs["chosen"].to_list()),
                     reply_hashes(prompts, pairs["rejected"].to_list())], axis=1)


@dataclass
class RewardPrior:
    """A linear reward on the concatenation of feature sets ``reads`` (widths ``dims``)."""

    name: str
    reads: tuple[str, ...]
    dims: tuple[int, ...]
    sources: dict[str, str]  # feature-set name -> what made it (policy: its weights' sha256; embeddings: the embedder)
    mean: np.ndarray
    weight: np.ndarray
    trained_on: str
    l2: float
    seen: np.ndarray  # sorted uint64 reply hashes of the training pairs

    def save(self, path: Path) -> None:
        meta = {"name": self.name, "reads": list(self.reads), "dims": list(self.dims),
                "sources": self.sources, "trained_on": self.trained_on, "l2": self.l2}
        np.savez_compressed(path, meta=np.array(json.dumps(meta)), mean=self.mean.astype(np.float32),
                            weight=self.weight.astype(np.float32), seen=np.sort(self.seen))

    @classmethod
    def load(cls, path: Path) -> "RewardPrior":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(meta["name"], tuple(meta["reads"]), tuple(meta["dims"]), meta["sources"],
                       z["mean"].astype(np.float64), z["weight"].astype(np.float64), meta["trained_on"],
                       float(meta["l2"]), z["seen"])

    def why_not(self, feature_sets, sources: Mapping[str, str | None], hashes: np.ndarray) -> str | None:
        """None if the prior applies to these features and pairs, else the reason it does not."""
        by_name = {fs.name: fs for fs in feature_sets}
        missing = [name for name in self.reads if name not in by_name]
        if missing:
            return f"no {', '.join(missing)} features in this run"
        widths = tuple(by_name[name].dim for name in self.reads)
        if widths != self.dims:
            return f"its features are {self.dims} wide, this run's {widths}"
        other = [name for name, source in self.sources.items() if sources.get(name) != source]
        if other:
            return f"this run's {', '.join(other)} features come from another model than the prior's"
        seen = int(np.isin(hashes, self.seen).any(axis=1).sum())
        if seen:
            # `seen` lists every reply of the priors' shared training samples, not only this prior's own
            return f"{seen} of the scored pairs were in the priors' training data (this one: {self.trained_on})"
        return None

    def rewards(self, feature_sets) -> tuple[np.ndarray, np.ndarray]:
        by_name = {fs.name: fs for fs in feature_sets}
        chosen = np.concatenate([by_name[name].chosen for name in self.reads], axis=1)
        rejected = np.concatenate([by_name[name].rejected for name in self.reads], axis=1)
        return (chosen - self.mean) @ self.weight, (rejected - self.mean) @ self.weight


def shipped_priors(directory: Path | None = None) -> list[RewardPrior]:
    return [RewardPrior.load(path) for path in sorted((directory or PRIOR_DIR).glob("*.npz"))]


PRIORS_SET = "priors"


def prior_feature_sets(feature_sets, pairs, sources: Mapping[str, str | None],
                       priors: Sequence[RewardPrior] | None = None) -> tuple[list, list[dict[str, Any]]]:
    """([the ``priors`` feature set: one column per prior that applies] or [], a record of every prior)."""
    from curate.scores.reward import FeatureSet

    priors = shipped_priors() if priors is None else priors
    hashes = pair_reply_hashes(pairs) if priors else None
    chosen, rejected, record = [], [], []
    for prior in priors:
        why = prior.why_not(feature_sets, sources, hashes)
        record.append({"name": prior.name, "reads": list(prior.reads), "trained_on": prior.trained_on,
                       "used": why is None, **({"why_not": why} if why else {})})
        if why is None:
            c, r = prior.rewards(feature_sets)
            chosen.append(c)
            rejected.append(r)
    if not chosen:
        return [], record
    return [FeatureSet(PRIORS_SET, np.stack(chosen, 1), np.stack(rejected, 1), (1,) * len(chosen))], record
