"""Preference strength from a reward-model ensemble (methods.md section 3).

Members of three kinds, any mix:

1. **Trained heads**: Bradley-Terry heads (L2 logistic regression on the
   difference of per-reply features, no intercept) on frozen feature sets,
   trained by *repeated* k-fold cross-fitting. One member = one head (all
   feature sets together, or all but one: :func:`ensemble_heads`) x one random
   split; each pair is scored by the fold model that never saw it, so every
   pair gets ``len(heads) x len(seeds)`` (>= 3 by default) out-of-fold scores.
2. **Pretrained reward models**: any ``AutoModelForSequenceClassification``
   reward model scores each (prompt, reply) through its chat template, or as
   the text pair (prompt, reply) for cross-encoder RMs such as OpenAssistant's
   DeBERTa (:func:`pretrained_member`, :func:`rm_input_format`). They never saw these labels: out-of-fold.
3. **Implicit rewards** of a DPO checkpoint: pass the per-pair
   beta * (log pi/pi_ref)(chosen) - (same)(rejected) as a member via
   :func:`member_from_rewards` (out-of-fold only if it was trained elsewhere).

Members are put on one scale by dividing each member's rewards by their
standard deviation over every reply of the dataset (a z-score: the mean
cancels in a margin). Per pair: mean margin, population std, vote share.

The math takes arrays and returns arrays; the run-directory orchestration
(features from the run, noise estimates, scores.parquet, manifest) is
:func:`score_reward_and_noise` at the bottom.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_expit

from curate.errors import CurateError

# Fixed, never tuned on the folds being scored. Features are standardised and
# each block scaled to unit total variance, so one value fits blocks of any
# width; 4 sits on the flat top of a coarse sweep (MiniLM-only head on HH,
# OOF AUC 0.667-0.673 for l2 in 2.6-26 on this scale).
DEFAULT_L2 = 4.0
MIN_PAIRS_PER_FOLD = 5
WEAK_AUC = 0.55  # below this out-of-fold AUC the ensemble's numbers are flagged as uninformative


@dataclass
class FeatureSet:
    """Per-reply features of one kind: ``chosen[i]`` and ``rejected[i]`` describe pair i."""

    name: str
    chosen: np.ndarray
    rejected: np.ndarray
    block_dims: tuple[int, ...] | None = None  # widths of the blocks side by side (None: one block)

    @property
    def dim(self) -> int:
        return int(self.chosen.shape[1])

    def column_block_width(self) -> np.ndarray:
        """Per column: the width of the block it belongs to (each block is scaled to unit total variance)."""
        dims = self.block_dims or (self.dim,)
        return np.repeat(np.asarray(dims, dtype=np.float64), dims)

    def swapped(self, flip: np.ndarray) -> "FeatureSet":
        """The same features with chosen and rejected exchanged where ``flip`` is True."""
        f = np.asarray(flip, dtype=bool)[:, None]
        return FeatureSet(self.name, np.where(f, self.rejected, self.chosen), np.where(f, self.chosen, self.rejected),
                          self.block_dims)

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
        if self.block_dims is not None and sum(self.block_dims) != self.dim:
            raise CurateError(f"feature set {self.name!r}: block widths {self.block_dims} do not add up to {self.dim}")


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
    return Member(name, kind, np.asarray(reward_chosen, dtype=np.float64),
                  np.asarray(reward_rejected, dtype=np.float64), out_of_fold, dict(info))


# ------------------------------------------------------------------ Bradley-Terry heads
def fold_ids(n: int, folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index (0..folds-1) of each of n pairs: balanced and random, whole groups per fold when given.

    ``groups`` (:func:`curate.folds.pair_groups`: pairs sharing a prompt or a
    reply) keeps a head from training on one pair of a group and scoring another.
    """
    if groups is None:
        return np.random.default_rng(seed).permutation(np.arange(n) % folds)
    from curate.folds import grouped_fold_ids

    if len(groups) != n:
        raise CurateError(f"fold groups have {len(groups)} entries for {n} pairs")
    return grouped_fold_ids(groups, folds, seed)


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


def nested_l2(diff: np.ndarray, grid: Sequence[float], *, inner_folds: int = 3, seed: int = 0,
              groups: np.ndarray | None = None) -> float:
    """The L2 of ``grid`` with the best inner cross-validated log-likelihood on ``diff`` (training pairs only).

    Called on the training folds of one outer split, so the pairs a head
    scores never take part in choosing its L2 (nested cross-validation).
    """
    inner = fold_ids(len(diff), inner_folds, seed, groups)
    scores = []
    for l2 in grid:
        loglik = 0.0
        for k in range(inner_folds):
            w = fit_bt_head(diff[inner != k], l2=l2)
            loglik += float(log_expit(diff[inner == k] @ w).sum())
        scores.append(loglik)
    return float(grid[int(np.argmax(scores))])


def block_standardisation(chosen: np.ndarray, rejected: np.ndarray,
                          block_width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of every column over all replies; each scale is the column's std times
    sqrt(its block's width), so every block has unit total variance."""
    mean = (chosen.sum(axis=0) + rejected.sum(axis=0)) / (2 * len(chosen))
    var = ((chosen * chosen).sum(axis=0) + (rejected * rejected).sum(axis=0)) / (2 * len(chosen)) - mean**2
    return mean, (np.sqrt(np.maximum(var, 0.0)) + 1e-8) * np.sqrt(block_width)


def cross_fit_head(features: FeatureSet, fold: np.ndarray, *, l2: float | Sequence[float] = DEFAULT_L2,
                   groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold rewards of every reply: each pair scored by the head that did not train on it.

    Features are standardised with the training folds' reply statistics and
    each column divided by sqrt(width of its block), so every block has unit
    total variance and one fixed ``l2`` suits a 1-dim length feature and a
    576-dim hidden state alike, also side by side in one head
    (:func:`concat_feature_sets`). The reward of a reply is w . standardised(features).
    A sequence ``l2`` is a grid: each outer training set picks its own value
    by :func:`nested_l2` (inner folds keep ``groups`` whole).
    """
    reward_c = np.empty(len(fold))
    reward_r = np.empty(len(fold))
    diff = features.chosen - features.rejected
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        mean, std = block_standardisation(features.chosen[train], features.rejected[train],
                                          features.column_block_width())
        scaled = diff[train] / std
        lam = l2 if np.isscalar(l2) else nested_l2(
            scaled, l2, seed=int(k), groups=None if groups is None else np.asarray(groups)[train])
        w = fit_bt_head(scaled, l2=lam) / std  # weights on the raw features
        reward_c[test] = (features.chosen[test] - mean) @ w
        reward_r[test] = (features.rejected[test] - mean) @ w
    return reward_c, reward_r


def head_members(
    feature_sets: Sequence[FeatureSet], *, seeds: Sequence[int] = (0, 1, 2), folds: int = 5, l2: float = DEFAULT_L2,
    groups: np.ndarray | None = None,
) -> list[Member]:
    """Repeated k-fold cross-fitting: one member per (feature set, split seed); folds keep ``groups`` whole."""
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
    from threadpoolctl import threadpool_limits

    # the matrices are small: BLAS threads only add spinning and contention
    with threadpool_limits(limits=1):
        return _cross_fit_members(feature_sets, n, seeds=seeds, folds=folds, l2=l2, groups=groups)


def _cross_fit_members(feature_sets, n, *, seeds, folds, l2, groups) -> list[Member]:
    members = []
    for seed in seeds:
        fold = fold_ids(n, folds, seed, groups)
        for fs in feature_sets:
            if len(fs.chosen) != n:
                raise CurateError(f"feature set {fs.name!r} has {len(fs.chosen)} rows, expected {n}")
            rc, rr = cross_fit_head(fs, fold, l2=l2, groups=groups)
            info = {"features": fs.name, "dim": int(fs.chosen.shape[1]), "seed": int(seed), "folds": folds,
                    "l2": l2 if np.isscalar(l2) else list(l2), "grouped_folds": groups is not None}
            members.append(Member(f"{fs.name}_s{seed}", "head", rc, rr, True, info))
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


def concat_feature_sets(feature_sets: Sequence[FeatureSet], name: str = "all") -> FeatureSet:
    """One feature set holding every block side by side; the heads scale each block to unit total variance.

    A head on it learns how much each block matters (averaging separate heads
    gives a weak block the same vote as a strong one). The block widths travel
    with the set (``block_dims``), so :func:`cross_fit_head` standardises each
    column and divides it by sqrt(its block's width): a 1-dim feature next to a
    576-dim block keeps the weight of a whole block.
    """
    dims: list[int] = []
    for fs in feature_sets:
        dims.extend(fs.block_dims or (fs.dim,))
    return FeatureSet(name, np.concatenate([fs.chosen for fs in feature_sets], axis=1),
                      np.concatenate([fs.rejected for fs in feature_sets], axis=1), tuple(dims))


def ensemble_heads(feature_sets: Sequence[FeatureSet]) -> list[FeatureSet]:
    """The heads the ensemble trains: all blocks together, plus each leave-one-block-out mix.

    Every head sees most of the signal (single weak blocks such as length
    would otherwise get an equal vote), and the leave-one-out heads make the
    members differ in what they look at, not only in their data split.
    """
    if len(feature_sets) <= 1:
        return list(feature_sets)
    heads = [concat_feature_sets(feature_sets, "all")]
    if len(feature_sets) > 2:
        for left_out in feature_sets:
            rest = [fs for fs in feature_sets if fs is not left_out]
            heads.append(concat_feature_sets(rest, f"no_{left_out.name}"))
    else:
        heads.extend(feature_sets)
    return heads


# ------------------------------------------------------------------ text statistics
_TEXT_PATTERNS = {
    "questions": r"\?",
    "apologies": r"\b(?:sorry|apologi[sz]e)",
    "negations": r"\b(?:not|no|never|can't|cannot|won't|don't)\b",
    "newlines": r"\n",
    "first_person": r"\b(?:I|I'm|I've|me|my)\b",
    "second_person": r"\b(?:you|your|you're)\b",
    "exclamations": r"!",
}


def text_statistics(texts: Sequence[str]) -> np.ndarray:
    """[n, 9] cheap per-reply statistics: log characters, log words, log(1 + count) of a few markers."""
    cols = [np.log1p([len(t) for t in texts]), np.log1p([len(t.split()) for t in texts])]
    for pattern in _TEXT_PATTERNS.values():
        rx = re.compile(pattern, flags=re.IGNORECASE)
        cols.append(np.log1p([len(rx.findall(t)) for t in texts]))
    return np.stack(cols, axis=1).astype(np.float64)


# ------------------------------------------------------------------ pretrained reward models
RM_INPUT_FORMATS = ("auto", "chat", "pair", "plain")
# Encoder (cross-encoder) reward models, e.g. OpenAssistant/reward-model-deberta-v3-large-v2, are trained on
# tokenizer(question, answer): the prompt and the reply as a text pair, not as one transcript.
_CROSS_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "distilbert", "albert",
                        "mpnet", "modernbert"}


def _plain_turns(messages: Sequence[Mapping[str, str]]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def rm_input_format(model, tokenizer, requested: str = "auto") -> str:
    """How a reward model reads (prompt, reply): ``chat`` (its chat template), ``pair`` or ``plain``.

    ``auto``: the chat template where the tokenizer has one; the text pair
    ``tokenizer(question, answer)`` for encoder models (DeBERTa, BERT, RoBERTa
    ... cross-encoder RMs); otherwise one "User: ... Assistant: ..." string.
    """
    if requested not in RM_INPUT_FORMATS:
        raise CurateError(f"unknown reward-model input format {requested!r}; choose one of {', '.join(RM_INPUT_FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_template:
        raise CurateError("this reward model's tokenizer has no chat template; use input format 'pair' or 'plain'")
    if requested != "auto":
        return requested
    if has_template:
        return "chat"
    if getattr(model.config, "model_type", None) in _CROSS_ENCODER_TYPES:
        return "pair"
    return "plain"


def _rm_inputs(tokenizer, fmt: str, prompts, replies: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(texts, second texts or None) that the tokenizer encodes for each (prompt, reply)."""
    if fmt == "pair":
        questions = [m[-1]["content"] if len(m) == 1 else _plain_turns(m) for m in prompts]
        return questions, list(replies)
    texts = []
    for messages, reply in zip(prompts, replies):
        chat = [{"role": m["role"], "content": m["content"]} for m in messages] + [{"role": "assistant", "content": reply}]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False) if fmt == "chat" else _plain_turns(chat))
    return texts, None


def pretrained_rewards(
    name_or_path: str, prompts, replies: Sequence[str], *, device: str = "auto", batch_size: int = 8,
    max_length: int = 1024, model_and_tokenizer=None, input_format: str = "auto",
) -> np.ndarray:
    """Reward of each (prompt, reply) from an ``AutoModelForSequenceClassification`` reward model.

    One output logit is the reward; with two, the second minus the first.
    ``input_format`` (:func:`rm_input_format`): the chat template, the text
    pair (cross-encoders) or plain turns. Long inputs are cut from the left
    so the reply is always scored.
    """
    import torch

    from curate.models import resolve_device

    if model_and_tokenizer is None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
        except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear sentence
            raise CurateError(
                f"reward model {name_or_path!r} failed to load ({type(exc).__name__}); pass a local path or a "
                "hub id of an AutoModelForSequenceClassification reward model (online)"
            ) from exc
    else:
        model, tokenizer = model_and_tokenizer
    n_labels = model.config.num_labels
    if n_labels not in (1, 2):
        raise CurateError(f"reward model {name_or_path!r} has {n_labels} outputs; expected 1 (a reward) or 2")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = "left"
    fmt = rm_input_format(model, tokenizer, input_format)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    texts, answers = _rm_inputs(tokenizer, fmt, prompts, replies)
    order = np.argsort([len(t) + (len(answers[i]) if answers else 0) for i, t in enumerate(texts)])
    rewards = np.empty(len(texts))
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            second = [answers[i] for i in idx] if answers else None
            enc = tokenizer([texts[i] for i in idx], second, padding=True,
                            truncation="only_first" if second else True, max_length=max_length,
                            return_tensors="pt", add_special_tokens=fmt != "chat")
            logits = model(**enc.to(dev)).logits.float()
            r = logits[:, 0] if n_labels == 1 else logits[:, 1] - logits[:, 0]
            rewards[idx] = r.cpu().numpy()
    return rewards


def pretrained_member(name_or_path: str, pairs, *, device: str = "auto", **kwargs) -> Member:
    """A pretrained reward model as an ensemble member (it never saw these labels: out-of-fold)."""
    prompts = pairs["prompt"].to_list()
    rewards = pretrained_rewards(name_or_path, prompts + prompts,
                                 pairs["chosen"].to_list() + pairs["rejected"].to_list(), device=device, **kwargs)
    n = pairs.height
    label = re.sub(r"[^A-Za-z0-9]+", "_", Path(name_or_path).name if Path(name_or_path).exists() else name_or_path)
    return Member(label.strip("_").lower(), "pretrained", rewards[:n], rewards[n:], True,
                  {"model": name_or_path, "input_format": kwargs.get("input_format", "auto")})


# ------------------------------------------------------------------ ensemble + noise table
def swap_members(members: Sequence[Member], flip: np.ndarray) -> list[Member]:
    """Members with chosen/rejected rewards exchanged where ``flip``: for members that did not learn the labels."""
    f = np.asarray(flip, dtype=bool)
    return [Member(m.name, m.kind, np.where(f, m.reward_rejected, m.reward_chosen),
                   np.where(f, m.reward_chosen, m.reward_rejected), m.out_of_fold, m.info) for m in members]


def ensemble_margins(
    feature_sets: Sequence[FeatureSet], fixed_members: Sequence[Member] = (), *,
    seeds: Sequence[int] = (0, 1, 2), folds: int = 5, l2: float = DEFAULT_L2, groups: np.ndarray | None = None,
) -> tuple[list[Member], np.ndarray]:
    """Cross-fit the heads and put every member on one scale: (members, [n_pairs, n_members] margins)."""
    members = head_members(ensemble_heads(feature_sets), seeds=seeds, folds=folds, l2=l2,
                           groups=groups) + list(fixed_members)
    if not members:
        raise CurateError("the reward ensemble has no members: give feature sets or --reward-model")
    return members, scaled_margins(members)


def reward_and_noise(feature_sets: Sequence[FeatureSet], fixed_members: Sequence[Member] = (), *,
                     seeds: Sequence[int] = (0, 1, 2), folds: int = 5, l2: float = DEFAULT_L2,
                     estimator: str | None = None, noise_seed: int = 0, groups: np.ndarray | None = None,
                     grouping: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the heads, combine every member, estimate noise: (columns, info).

    Columns: ``rm_margin_mean``, ``rm_margin_std``, ``rm_vote_share``,
    ``rm_m_<member>``, ``p_chosen`` (the default estimator's clean posterior that
    the chosen reply is better), ``p_label`` (its probability that the label
    says chosen: q = eps + (1 - 2 eps) p_chosen), ``rm_out_of_fold``, ``flip_prob`` (the
    estimator's posterior that the label is flipped, calibrated where its model
    holds) and ``flip_prob_conservative`` (the posterior at the rate the data
    support, the estimate's ``rate_used``: what curation and training act on). ``info`` holds the ensemble's OOF AUC/accuracy and every
    estimator's rate (what the manifest records). ``groups`` keeps pairs that
    share a prompt or a reply in one fold (:func:`curate.folds.pair_groups`).
    """
    from curate.scores import noise

    estimator = estimator or noise.DEFAULT_ESTIMATOR
    noise.get_estimator(estimator)  # an unknown name fails before the heads are trained
    members, margins = ensemble_margins(feature_sets, fixed_members, seeds=seeds, folds=folds, l2=l2, groups=groups)
    stats = ensemble_stats(margins)
    estimates = noise.estimate_all(stats["rm_margin_mean"], margins, seed=noise_seed,
                                   names=[estimator] + [k for k in noise.ESTIMATORS if k != estimator])
    chosen = estimates[estimator]
    columns = dict(stats)
    columns.update({f"rm_m_{m.name}": margins[:, j] for j, m in enumerate(members)})
    columns["p_chosen"] = chosen.p_clean
    columns["p_label"] = noise.noisy_posterior(chosen.p_clean, chosen.rate_used)
    columns["rm_out_of_fold"] = np.full(margins.shape[0], all(m.out_of_fold for m in members))
    columns["flip_prob"] = chosen.flip_prob
    columns["flip_prob_conservative"] = chosen.flip_prob_conservative
    quality = ensemble_quality(members, margins, seeds)
    single = {}
    if len(feature_sets) > 1:  # which features carry the signal: one head per block, first seed
        for fs in feature_sets:
            (m,) = head_members([fs], seeds=seeds[:1], folds=folds, l2=l2, groups=groups)
            single[fs.name] = oriented_auc(m.margin, seed=seeds[0])["auc"]
    notes = []
    if not quality.get("auc", 1.0) > WEAK_AUC:  # also catches NaN
        notes.append(
            f"the ensemble's out-of-fold AUC is {quality.get('auc', float('nan')):.3f}, near chance: "
            "strength, p_chosen and flip estimates carry little information; add features or a reward model"
        )
        warnings.warn(notes[-1], stacklevel=2)
    noise_notes = list(notes)
    if chosen.identifiable is False:
        noise_notes.append(noise.summary(chosen))
    info = {
        "reward": {
            "warnings": notes,
            "members": [{"name": m.name, "kind": m.kind, "out_of_fold": m.out_of_fold, **m.info} for m in members],
            "feature_sets": {fs.name: fs.dim for fs in feature_sets},
            "folds": folds, "seeds": list(seeds), "l2": l2 if np.isscalar(l2) else list(l2),
            "fold_grouping": grouping or ("grouped" if groups is not None else "none (random per pair)"),
            "n_fold_groups": None if groups is None else int(len(np.unique(groups))),
            "hyperparameters": ("fixed (not tuned on the scored folds)" if np.isscalar(l2) else
                                "L2 chosen per outer training set by inner 3-fold CV (nested)"),
            "out_of_fold": bool(all(m.out_of_fold for m in members)),
            "oof_auc": quality.get("auc"), "oof_accuracy": quality.get("accuracy"),
            "auc_per_seed": quality.get("auc_per_seed"), "auc_all_members": quality["auc_all_members"],
            "auc_by_member_group": quality["auc_by_member_group"], "auc_by_feature_set": single,
            "auc_protocol": "AUC over randomly oriented pairs of the mean out-of-fold margin, per split seed, averaged",
        },
        "noise": {
            "warnings": noise_notes,
            "default_estimator": estimator,
            "flip_rate": chosen.rate,
            "flip_rate_interval": None if chosen.interval is None else [float(v) for v in chosen.interval],
            "identifiable": chosen.identifiable,
            "flip_rate_posterior_mean": chosen.details.get("rate_posterior_mean"),
            "conservative_rate": chosen.rate_used,
            "conservative_basis": ("the interval's lower end (the rate is not identifiable)"
                                   if chosen.identifiable is False else "the estimated rate"),
            "summary": noise.summary(chosen),
            "estimators": {k: _estimate_info(e) for k, e in estimates.items()},
        },
    }
    return columns, info


def _estimate_info(e) -> dict[str, Any]:
    return {"rate": e.rate, "interval": None if e.interval is None else [float(v) for v in e.interval],
            "identifiable": e.identifiable, "rate_used": e.rate_used, "assumption": e.assumption, **e.details}


# ------------------------------------------------------------------ run directory
POOLED_FILE = "pooled.npz"


def policy_feature_set(run, pair_ids: Sequence[str], pooled: Mapping[str, np.ndarray] | None = None) -> FeatureSet | None:
    """The policy's mean-pooled reply states from the CHES pass, aligned to ``pair_ids``.

    ``pooled`` (or ``RUN/pooled.npz``) holds ``pair_id`` and either
    ``mean_chosen``/``mean_rejected`` [n, d] or ``sum_chosen``/``sum_rejected``
    with ``len_chosen``/``len_rejected``. None when neither exists. With
    ``layers`` [k] (the engine's probe layers side by side) each layer is a
    block of its own (d / k columns); without it, one block (older runs).
    """
    if pooled is None:
        path = run / POOLED_FILE
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            pooled = {k: z[k] for k in z.files}
    if "mean_chosen" in pooled:
        mc, mr = pooled["mean_chosen"], pooled["mean_rejected"]
    else:
        mc = pooled["sum_chosen"] / np.asarray(pooled["len_chosen"], dtype=np.float64)[:, None]
        mr = pooled["sum_rejected"] / np.asarray(pooled["len_rejected"], dtype=np.float64)[:, None]
    index = {str(p): i for i, p in enumerate(pooled["pair_id"])}
    missing = [p for p in pair_ids if p not in index]
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(pair_ids)} pairs have no pooled policy states (quarantined or not scored); "
            "the reward heads run without the policy feature set. Rerun `curate score --scores ches` to include it.",
            stacklevel=2,
        )
        return None
    rows = np.array([index[p] for p in pair_ids])
    k = len(pooled["layers"]) if "layers" in pooled else 1
    return FeatureSet("policy", np.asarray(mc)[rows], np.asarray(mr)[rows], (np.shape(mc)[1] // k,) * k)


LOGP_COLUMNS = ("logp_chosen", "logp_rejected", "logp_mean_chosen", "logp_mean_rejected")


def policy_logp_feature_set(run, pair_ids: Sequence[str]) -> FeatureSet | None:
    """The policy's reply log-probs (sum and per-token mean) from the CHES/logps pass, if the run has them."""
    if run is None:
        return None
    scores = run.scores()
    if not set(LOGP_COLUMNS) <= set(scores.columns):
        return None
    import polars as pl

    table = pl.DataFrame({"pair_id": list(pair_ids)}).join(scores.select("pair_id", *LOGP_COLUMNS), on="pair_id", how="left")
    values = table.select(LOGP_COLUMNS).to_numpy().astype(np.float64)
    if not np.isfinite(values).all():
        warnings.warn("some pairs have no policy log-probs; the heads run without them", stacklevel=2)
        return None
    return FeatureSet("policy_logp", values[:, [0, 2]], values[:, [1, 3]])


def last_user_message(messages: Sequence[Mapping[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def build_feature_sets(
    pairs, *, run=None, embedder: str | None = "all-minilm-l6-v2", pooled=None, text_stats: bool = True,
    device: str = "auto", cache_dir=None,
) -> list[FeatureSet]:
    """Frozen feature sets of every pair, none of which depends on the labels.

    - ``policy``: the policy's mean-pooled reply states at its probe layers, one block per layer (CHES pass, if present),
    - ``policy_logp``: the policy's reply log-probs (logps pass, if present),
    - ``reply_emb``: sentence embeddings of the replies (``embedder``),
    - ``relevance``: cosine of each reply's embedding with the last user turn's,
    - ``text_stats``: :func:`text_statistics`.
    """
    sets = []
    if run is not None or pooled is not None:
        policy = policy_feature_set(run, pairs["pair_id"].to_list(), pooled)
        if policy is not None:
            sets.append(policy)
        logp = policy_logp_feature_set(run, pairs["pair_id"].to_list())
        if logp is not None:
            sets.append(logp)
    if embedder:
        from curate.embeddings import embed_texts

        n = pairs.height
        prompts = [last_user_message(m) for m in pairs["prompt"].to_list()]
        texts = pairs["chosen"].to_list() + pairs["rejected"].to_list() + prompts
        emb = embed_texts(texts, model=embedder, device=device, cache_dir=cache_dir, show_progress=False)
        chosen, rejected, prompt = emb[:n], emb[n : 2 * n], emb[2 * n :]
        sets.append(FeatureSet("reply_emb", chosen, rejected))
        sets.append(FeatureSet("relevance", (chosen * prompt).sum(axis=1), (rejected * prompt).sum(axis=1)))
    if text_stats:
        sets.append(FeatureSet("text_stats", text_statistics(pairs["chosen"].to_list()),
                               text_statistics(pairs["rejected"].to_list())))
    return sets


def score_reward_and_noise(run, *, reward_models: Sequence[str] = (), embedder: str | None = "all-minilm-l6-v2",
                           pooled: Mapping[str, np.ndarray] | None = None, text_stats: bool = True,
                           extra_members: Sequence[Member] = (), seeds: Sequence[int] = (0, 1, 2), folds: int = 5,
                           l2: float = DEFAULT_L2, estimator: str | None = None, device: str = "auto", cache_dir=None,
                           priors: bool = True):
    """Reward-ensemble strength and noise-flip columns for a run; merged into RUN/scores.parquet.

    Feature sets: the policy's pooled reply states (``pooled`` or
    ``RUN/pooled.npz`` from the CHES pass; never recomputed here), reply
    embeddings from ``embedder`` (None to skip) and text statistics. Each
    ``reward_models`` entry adds a pretrained reward model; ``extra_members``
    adds precomputed ones (e.g. implicit DPO rewards). ``priors``: add the
    shipped reward priors that apply (:mod:`curate.scores.prior`). Writes manifest
    sections ``reward`` and ``noise`` and returns the new columns.
    """
    import time

    import polars as pl

    from curate.rundir import RunDir

    run = run if isinstance(run, RunDir) else RunDir(run)
    pairs = run.pairs()
    if pairs.height == 0:
        raise CurateError(f"{run.path} has no pairs to score")
    started = time.perf_counter()
    feature_sets = build_feature_sets(pairs, run=run, embedder=embedder, pooled=pooled, text_stats=text_stats,
                                      device=device, cache_dir=cache_dir)
    priors_used: list[dict[str, Any]] = []
    if priors:
        from curate.rundir import ScoreSection
        from curate.scores.prior import prior_feature_sets

        model = (run.section(ScoreSection) or ScoreSection()).model or {}
        sources = {"policy": model.get("file_sha256"), "reply_emb": embedder, "relevance": embedder}
        prior_sets, priors_used = prior_feature_sets(feature_sets, pairs, sources)
        feature_sets += prior_sets
    features_s = time.perf_counter() - started
    fixed = [pretrained_member(name, pairs, device=device) for name in reward_models] + list(extra_members)
    from curate.folds import pair_groups

    groups, grouping = pair_groups(pairs)
    columns, info = reward_and_noise(feature_sets, fixed, seeds=seeds, folds=folds, l2=l2, estimator=estimator,
                                     groups=groups, grouping=grouping)
    table = pl.DataFrame({"pair_id": pairs["pair_id"], **columns})
    run.merge_scores(table)
    info["reward"]["seconds"] = {"features": round(features_s, 2), "total": round(time.perf_counter() - started, 2)}
    info["reward"]["embedder"] = embedder
    info["reward"]["policy_states"] = any(fs.name == "policy" for fs in feature_sets)
    info["reward"]["policy_logps"] = any(fs.name == "policy_logp" for fs in feature_sets)
    info["reward"]["priors"] = priors_used
    run.update_manifest("reward", info["reward"])
    run.update_manifest("noise", info["noise"])
    return table
