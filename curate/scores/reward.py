"""Preference strength from a reward-model ensemble (methods.md section 3).

Members of three kinds, any mix:

1. **Trained heads**: Bradley-Terry heads (L2 logistic regression on the
   difference of per-reply features, no intercept) on frozen feature sets,
   trained by *repeated* k-fold cross-fitting. One member = one feature set x
   one random split; each pair is scored by the fold model that never saw it,
   so every pair gets ``len(feature_sets) x len(seeds)`` out-of-fold scores.
2. **Pretrained reward models**: any ``AutoModelForSequenceClassification``
   reward model scores each (prompt, reply) through its chat template
   (:func:`pretrained_member`). They never saw these labels: out-of-fold.
3. **Implicit rewards** of a DPO checkpoint: pass the per-pair
   beta * (log pi/pi_ref)(chosen) - (same)(rejected) as a member via
   :func:`member_from_rewards` (out-of-fold only if it was trained elsewhere).

Members are put on one scale by dividing each member's rewards by their
standard deviation over every reply of the dataset (a z-score: the mean
cancels in a margin). Per pair: mean margin, population std, vote share.

Everything here takes arrays and returns arrays; the run-directory
orchestration is :func:`curate.scores.reward_run.score_reward_and_noise`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_expit

from curate.errors import CurateError

# Fixed, not tuned on the folds being scored: L2 strength per pair on
# standardised feature differences (chosen once on synthetic data).
DEFAULT_L2 = 1.0
MIN_PAIRS_PER_FOLD = 5


@dataclass
class FeatureSet:
    """Per-reply features of one kind: ``chosen[i]`` and ``rejected[i]`` describe pair i."""

    name: str
    chosen: np.ndarray
    rejected: np.ndarray

    def __post_init__(self) -> None:
        self.chosen = np.asarray(self.chosen, dtype=np.float64)
        self.rejected = np.asarray(self.rejected, dtype=np.float64)
        if self.chosen.ndim == 1:
            self.chosen = self.chosen[:, None]
            self.rejected = self.rejected[:, None]
        if self.chosen.shape != self.rejected.shape:
            raise CurateError(f"feature set {self.name!r}: chosen and rejected features differ in shape")
        if not (np.isfinite(self.chosen).all() and np.isfinite(self.rejected).all()):
            raise CurateError(f"feature set {self.name!r} has NaN or infinite values; recompute the features")


@dataclass
class Member:
    """One ensemble member: a reward for every reply, and whether it is out-of-fold."""

    name: str
    kind: str  # "head", "pretrained" or "implicit"
    reward_chosen: np.ndarray
    reward_rejected: np.ndarray
    out_of_fold: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def margin(self) -> np.ndarray:
        return self.reward_chosen - self.reward_rejected


def member_from_rewards(name: str, reward_chosen, reward_rejected, *, kind: str = "implicit", out_of_fold: bool = False, **info) -> Member:
    """Wrap precomputed per-reply rewards (implicit DPO rewards, an external RM) as a member."""
    return Member(
        name, kind, np.asarray(reward_chosen, dtype=np.float64), np.asarray(reward_rejected, dtype=np.float64),
        out_of_fold, dict(info),
    )


# ------------------------------------------------------------------ Bradley-Terry heads
def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """Balanced random fold index (0..folds-1) of each of n pairs."""
    return np.random.default_rng(seed).permutation(np.arange(n) % folds)


def fit_bt_head(diff: np.ndarray, *, l2: float = DEFAULT_L2) -> np.ndarray:
    """Bradley-Terry weights w maximising sum log sigmoid(w . d_i) - l2/2 |w|^2.

    ``diff`` [n, d] = features(chosen) - features(rejected). No intercept:
    swapping the replies negates the score, as a preference model must.
    """
    diff = np.asarray(diff, dtype=np.float64)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = diff @ w
        loss = -log_expit(z).sum() + 0.5 * l2 * w @ w
        grad = -diff.T @ np.exp(log_expit(-z)) + l2 * w
        return loss, grad

    res = minimize(objective, np.zeros(diff.shape[1]), jac=True, method="L-BFGS-B")
    return res.x


def cross_fit_head(features: FeatureSet, fold: np.ndarray, *, l2: float = DEFAULT_L2) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold rewards of every reply: each pair scored by the head that did not train on it.

    Features are standardised with the training folds' reply statistics; the
    reward of a reply is w . standardised(features).
    """
    reward_c = np.empty(len(fold))
    reward_r = np.empty(len(fold))
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        replies = np.concatenate([features.chosen[train], features.rejected[train]])
        mean, std = replies.mean(axis=0), replies.std(axis=0) + 1e-8
        xc = (features.chosen - mean) / std
        xr = (features.rejected - mean) / std
        w = fit_bt_head(xc[train] - xr[train], l2=l2)
        reward_c[test] = xc[test] @ w
        reward_r[test] = xr[test] @ w
    return reward_c, reward_r


def head_members(
    feature_sets: Sequence[FeatureSet], *, seeds: Sequence[int] = (0, 1, 2), folds: int = 5, l2: float = DEFAULT_L2,
) -> list[Member]:
    """Repeated k-fold cross-fitting: one member per (feature set, split seed)."""
    if not feature_sets:
        return []
    n = len(feature_sets[0].chosen)
    if folds < 2:
        raise CurateError("--folds must be at least 2 for out-of-fold reward heads")
    if n < folds * MIN_PAIRS_PER_FOLD:
        raise CurateError(
            f"{n} pairs are too few for {folds}-fold reward heads (need {folds * MIN_PAIRS_PER_FOLD}); "
            "use fewer --folds or more pairs"
        )
    members = []
    for seed in seeds:
        fold = fold_ids(n, folds, seed)
        for fs in feature_sets:
            if len(fs.chosen) != n:
                raise CurateError(f"feature set {fs.name!r} has {len(fs.chosen)} rows, expected {n}")
            rc, rr = cross_fit_head(fs, fold, l2=l2)
            members.append(Member(
                f"{fs.name}_s{seed}", "head", rc, rr, True,
                {"features": fs.name, "dim": int(fs.chosen.shape[1]), "seed": int(seed), "folds": folds, "l2": l2},
            ))
    return members


# ------------------------------------------------------------------ the ensemble
def scaled_margins(members: Sequence[Member]) -> np.ndarray:
    """[n_pairs, n_members] margins, each member divided by its rewards' std over all replies."""
    cols = []
    for m in members:
        scale = np.concatenate([m.reward_chosen, m.reward_rejected]).std()
        if not np.isfinite(scale) or scale <= 0:
            raise CurateError(f"reward member {m.name!r} gives every reply the same reward; drop it")
        cols.append(m.margin / scale)
    return np.stack(cols, axis=1)


def ensemble_stats(margins: np.ndarray) -> dict[str, np.ndarray]:
    """Per pair: mean margin, population std, and the share of members with margin > 0."""
    return {
        "rm_margin_mean": margins.mean(axis=1),
        "rm_margin_std": margins.std(axis=1),
        "rm_vote_share": (margins > 0).mean(axis=1),
    }


def oriented_auc(margin: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """AUC and accuracy over randomly oriented pairs (label: "A is chosen", score: s_A - s_B)."""
    from sklearn.metrics import roc_auc_score

    margin = np.asarray(margin, dtype=float)
    a_is_chosen = np.random.default_rng(seed).random(len(margin)) < 0.5
    if a_is_chosen.all() or not a_is_chosen.any():
        return {"auc": float("nan"), "accuracy": float((margin > 0).mean())}
    score = np.where(a_is_chosen, margin, -margin)
    return {
        "auc": float(roc_auc_score(a_is_chosen, score)),
        "accuracy": float((margin > 0).mean() + 0.5 * (margin == 0).mean()),
    }


def ensemble_quality(members: Sequence[Member], margins: np.ndarray, seeds: Sequence[int]) -> dict[str, Any]:
    """OOF AUC/accuracy of the ensemble per split seed (averaged), of the whole ensemble, and per feature set."""
    names = [m.name for m in members]
    out: dict[str, Any] = {}
    per_seed = []
    for seed in seeds:
        cols = [j for j, m in enumerate(members) if m.info.get("seed") == seed or m.kind != "head"]
        per_seed.append(oriented_auc(margins[:, cols].mean(axis=1), seed=seed))
    if per_seed:
        out["auc"] = float(np.mean([r["auc"] for r in per_seed]))
        out["accuracy"] = float(np.mean([r["accuracy"] for r in per_seed]))
        out["auc_per_seed"] = [r["auc"] for r in per_seed]
    out["auc_all_members"] = oriented_auc(margins.mean(axis=1))["auc"]
    groups: dict[str, list[int]] = {}
    for j, m in enumerate(members):
        groups.setdefault(m.info.get("features", m.name), []).append(j)
    out["auc_by_member_group"] = {
        g: float(np.mean([oriented_auc(margins[:, j], seed=k)["auc"] for k, j in enumerate(idx)]))
        for g, idx in groups.items()
    }
    out["members"] = names
    return out
