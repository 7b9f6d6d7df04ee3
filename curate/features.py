"""Interpretable SAE features of preference data (WIMHF, Movva et al. 2025).

What did the annotators reward? For every pair, embed both replies, take the
difference e(chosen) - e(rejected), and learn a small signed sparse dictionary
of those differences (:mod:`curate.sae`). Each feature is then

- described by its top-activating pairs (oriented so the reply with more of the
  feature is shown first) and the n-grams that separate those replies from
  the other side, and
- tested as a preference predictor: a logistic regression of the label on the
  feature's activation plus the length difference, fit on ONE random
  orientation per pair (which reply is "A" is a seeded coin flip, so the label
  "A was chosen" is balanced; the +/- copies are for SAE training only).

Whole-set: validation AUCs of all features + length, of a probe on the raw
embedding differences (with and without length) and of length alone, and the
two fractions of the probe's signal the features explain.

Pure functions of arrays sit at the top; :func:`compute_features` runs the
pipeline on a pair table and :func:`run_features` reads/writes a run directory.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from curate.errors import CurateError


@dataclass
class FeatureSettings:
    """Knobs of the WIMHF pipeline; defaults follow the paper's code (`rmovva/wimhf`) except ``lr``.

    WIMHF trains with lr 5e-4 on datasets of 10k+ pairs. On ~1,800 pairs an
    epoch is only ~11 steps and the SAE was still improving at the 50-epoch
    cap. Measured on the 1,794 shared HH harmless pairs (cross-fitted AUCs,
    seeds 0/1/2): lr 1e-3 gave signal fraction 0.95/0.75/0.86 and beyond-length
    0.86/0.48/0.71; lr 2e-3 gave 0.94/0.84/0.85 and 0.84/0.65/0.69, early-stopping
    at epochs 19-30. Pass ``lr=5e-4`` to reproduce WIMHF's setting.
    """

    n_features: int = 32
    k: int = 4
    prefixes: tuple[int, ...] = (8, 32)
    batch_size: int = 256
    lr: float = 2e-3
    max_epochs: int = 50
    min_epochs: int = 10
    patience: int = 3
    val_fraction: float = 0.2
    cv_folds: int = 5
    seed: int = 0
    embedder: str = "all-minilm-l6-v2"
    top_fraction: float = 0.05
    n_examples: int = 5
    n_ngrams: int = 6
    device: str = "auto"


@dataclass
class FeatureResult:
    table: pl.DataFrame  # one row per feature
    summary: dict[str, Any]  # whole-set AUCs, fractions, settings
    activations: pl.DataFrame  # pair_id + sae_f{j} (chosen - rejected orientation)
    sae: Any = field(repr=False, default=None)


# ====================================================================== pure math
def word_count(texts: Sequence[str]) -> np.ndarray:
    return np.array([len(t.split()) for t in texts], dtype=np.float64)


def random_orientation(n: int, seed: int) -> np.ndarray:
    """+1 where reply A is the chosen one, -1 where A is the rejected one (a seeded fair coin per pair)."""
    return np.where(np.random.default_rng(seed).random(n) < 0.5, 1.0, -1.0)


def split_by_group(groups: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows; rows sharing a group (e.g. the same prompt) stay together."""
    unique = sorted(set(groups))
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(unique)))
    val_groups = set(np.array(unique, dtype=object)[rng.permutation(len(unique))[:n_val]].tolist())
    return np.array([g in val_groups for g in groups], dtype=bool)


def signed_augment(differences: np.ndarray) -> np.ndarray:
    """Rows and their negations, so the SAE sees every pair in both orientations."""
    return np.concatenate([differences, -differences], axis=0)


def fit_logistic(X: np.ndarray, y: np.ndarray, *, max_iter: int = 100, tol: float = 1e-10):
    """Unpenalised logistic regression by Newton-Raphson (X includes any intercept column).

    Returns ``(beta, standard_errors, log_likelihood)``: the maximum-likelihood
    coefficients, their Wald standard errors from the inverse observed
    information and the maximised log-likelihood, as statsmodels'
    ``Logit(y, X).fit()`` reports them (``params``, ``bse``, ``llf``). Under
    perfect separation the coefficients grow until ``max_iter``; the
    log-likelihood still converges (towards 0), which is why
    :func:`likelihood_ratio_p_value` is used for tests.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    beta = np.zeros(X.shape[1])
    for _ in range(max_iter):
        p = _sigmoid(X @ beta)
        hessian = X.T @ (X * (p * (1.0 - p))[:, None])
        step = np.linalg.lstsq(hessian, X.T @ (y - p), rcond=None)[0]
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            break
    eta = X @ beta
    p = _sigmoid(eta)
    hessian = X.T @ (X * (p * (1.0 - p))[:, None])
    se = np.sqrt(np.clip(np.diag(np.linalg.pinv(hessian)), 0.0, None))
    # log-likelihood in a form that stays finite for large |eta|
    loglik = float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    return beta, se, loglik


def wald_p_value(coef: float, se: float) -> float:
    """Two-sided p-value of z = coef / se under a standard normal."""
    if not np.isfinite(se) or se <= 0:
        return 1.0
    return float(math.erfc(abs(coef / se) / math.sqrt(2.0)))


def likelihood_ratio_p_value(loglik_full: float, loglik_reduced: float) -> float:
    """P(chi-square with 1 dof > 2 (ll_full - ll_reduced)): the test of one added coefficient.

    Unlike the Wald test it stays meaningful when a feature (nearly) separates
    the labels, where the Wald standard error explodes and p goes to 1.
    """
    statistic = max(0.0, 2.0 * (loglik_full - loglik_reduced))
    return float(math.erfc(math.sqrt(statistic / 2.0)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow warnings


def feature_effects(
    activations: np.ndarray, length_diff: np.ndarray, a_chosen: np.ndarray
) -> pl.DataFrame:
    """Per-feature preference effect, controlling for length.

    ``activations`` [n, M] are the SAE activations of e(A) - e(B) in one random
    orientation per pair, ``length_diff`` [n] is words(A) - words(B) and
    ``a_chosen`` [n] is 1 where A is the chosen reply. For each feature j the
    model is  P(A chosen) = sigmoid(b0 + bL * length_diff + bj * act_j)
    (columns scaled by their standard deviation, not centred, so an activation
    of 0 stays 0). Returns, per feature:

    - ``prevalence``: fraction of pairs where the feature is active (non-zero);
    - ``coef``: bj per standard deviation of the activation; ``p_value``: the
      likelihood-ratio test of bj = 0 (robust to separation, unlike Wald);
      ``p_bonferroni`` = min(1, M * p_value);
    - ``win_rate_delta``: over active pairs, oriented so the activation is
      positive, the mean of P(that reply wins) minus the same with the
      feature set to 0: how much more often the reply with more of the feature
      wins, beyond what its length predicts (+0.10 = ten points more).
    """
    activations = np.asarray(activations, dtype=np.float64)
    n, n_features = activations.shape
    length_scale = length_diff.std() or 1.0
    base = np.column_stack([np.ones(n), length_diff / length_scale])
    _, _, loglik_base = fit_logistic(base, a_chosen)
    rows = []
    for j in range(n_features):
        act = activations[:, j]
        active = act != 0
        scale = act.std()
        if active.sum() < 2 or scale == 0:
            rows.append(dict(feature=j, prevalence=float(active.mean()), coef=0.0, p_value=1.0, win_rate_delta=0.0))
            continue
        X = np.column_stack([base, act / scale])
        beta, _, loglik = fit_logistic(X, a_chosen)
        sign = np.sign(act[active])
        eta_without = X[active, :2] @ beta[:2]
        eta_with = eta_without + beta[2] * X[active, 2]
        delta = float(np.mean(_sigmoid(sign * eta_with) - _sigmoid(sign * eta_without)))
        rows.append(dict(feature=j, prevalence=float(active.mean()), coef=float(beta[2]),
                         p_value=likelihood_ratio_p_value(loglik, loglik_base), win_rate_delta=delta))
    table = pl.DataFrame(rows)
    return table.with_columns(p_bonferroni=(pl.col("p_value") * n_features).clip(upper_bound=1.0))


def group_folds(groups: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) per row; rows sharing a group (e.g. a prompt) share a fold."""
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[i]: rank % n_folds for rank, i in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def cross_fitted_auc(X: np.ndarray, y: np.ndarray, folds: np.ndarray, Cs: Sequence[float] = (1.0,)) -> float:
    """ROC-AUC of out-of-fold predictions of a standardised L2 logistic regression.

    Every row is predicted by a model fit on the other folds only, and the AUC
    pools all rows (far less noisy than one 20% split). With several ``Cs``
    the best pooled AUC is reported: a small optimistic bias, used only for the
    reference probe, so the fractions built on it err low, not high.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = -math.inf
    for C in Cs:
        predicted = np.empty(len(y))
        for fold in np.unique(folds):
            fit_rows, test_rows = folds != fold, folds == fold
            model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
            model.fit(X[fit_rows], y[fit_rows])
            predicted[test_rows] = model.predict_proba(X[test_rows])[:, 1]
        best = max(best, float(roc_auc_score(y, predicted)))
    return best


#: C grid of the raw-embedding probe (a 384-d probe over-fits at C=1 on a few thousand pairs)
PROBE_CS = (1e-3, 1e-2, 1e-1)


def signal_fractions(auc_sae: float, auc_probe: float, auc_probe_length: float, auc_length: float) -> dict[str, float | None]:
    """WIMHF's fraction of signal explained and its beyond-length variant (None when undefined)."""

    def ratio(num: float, den: float) -> float | None:
        return float(num / den) if den > 1e-9 else None

    return {
        "signal_fraction": ratio(auc_sae - 0.5, auc_probe - 0.5),
        "signal_fraction_beyond_length": ratio(auc_sae - auc_length, auc_probe_length - auc_length),
    }


_TOKEN = re.compile(r"[a-z0-9']+")
# Unigrams too common to describe anything; they still count inside bigrams.
_STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his i if in is it its me my of on or our she so "
    "that the their them there they this to was we were what which who will with would you your s t".split()
)


def _ngrams(text: str, max_n: int = 2) -> set[str]:
    tokens = _TOKEN.findall(text.lower().replace("\u2019", "'"))
    grams = {t for t in tokens if t not in _STOPWORDS}
    for n in range(2, max_n + 1):
        grams.update(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return grams


def distinguishing_ngrams(high: Sequence[str], low: Sequence[str], n: int = 6, min_count: int = 2) -> tuple[list[str], list[str]]:
    """Unigrams/bigrams most over-represented in ``high`` vs ``low`` texts, and vice versa.

    Scored by the smoothed log-ratio of document frequencies,
    log((df_high + 1) / (N_high + 2)) - log((df_low + 1) / (N_low + 2)); an
    n-gram must occur in at least ``min_count`` texts on its own side. A bigram
    replaces its unigrams when it scores at least as well, so lists stay short.
    """
    df_high = Counter(g for t in high for g in _ngrams(t))
    df_low = Counter(g for t in low for g in _ngrams(t))

    def score(g: str) -> float:
        return math.log((df_high[g] + 1) / (len(high) + 2)) - math.log((df_low[g] + 1) / (len(low) + 2))

    def top(counts: Counter, sign: float) -> list[str]:
        ranked = sorted((g for g, c in counts.items() if c >= min_count), key=lambda g: (-sign * score(g), g))
        chosen: list[str] = []
        for g in ranked:
            if sign * score(g) <= 0 or len(chosen) >= n:
                break
            if any(g in c.split() or c in g.split() for c in chosen):
                continue
            chosen.append(g)
        return chosen

    return top(df_high, 1.0), top(df_low, -1.0)


def _shorten(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_features(activations: np.ndarray, chosen: Sequence[str], rejected: Sequence[str], pair_ids: Sequence[str],
                      *, top_fraction: float = 0.05, n_examples: int = 5, n_ngrams: int = 6, min_pairs: int = 20,
                      ) -> pl.DataFrame:
    """Offline descriptions from top-activating pairs.

    ``activations`` [n, M] are in the chosen - rejected orientation. For each
    feature, take the pairs in the top ``top_fraction`` of |activation| among
    active pairs (at least ``min_pairs``, so the n-gram counts mean something), orient each so the activation is
    positive ("high" = the reply with more of the feature, which is the chosen
    one when the activation is positive) and contrast the high replies' n-grams
    with the low replies'. ``win_rate_active`` is the fraction of active pairs
    whose high reply is the chosen one.
    """
    rows = []
    for j in range(activations.shape[1]):
        act = activations[:, j]
        active = np.flatnonzero(act != 0)
        if active.size == 0:
            rows.append(dict(feature=j, description="(never active)", more=[], less=[], win_rate_active=None,
                             top_pair_ids=[], examples=[]))
            continue
        n_top = max(n_examples, min_pairs, int(math.ceil(top_fraction * active.size)))
        top = active[np.argsort(-np.abs(act[active]), kind="stable")[:n_top]]
        high = [chosen[i] if act[i] > 0 else rejected[i] for i in top]
        low = [rejected[i] if act[i] > 0 else chosen[i] for i in top]
        more, less = distinguishing_ngrams(high, low, n=n_ngrams)
        description = f"more: {', '.join(more) or '-'} | less: {', '.join(less) or '-'}"
        examples = [
            f"[{'chosen' if act[i] > 0 else 'rejected'} has more, {abs(act[i]):.2f}] "
            f"HIGH: {_shorten(h)} || LOW: {_shorten(lo)}"
            for i, h, lo in zip(top[:n_examples], high, low)
        ]
        rows.append(dict(feature=j, description=description, more=more, less=less,
                         win_rate_active=float(np.mean(act[active] > 0)),
                         top_pair_ids=[pair_ids[i] for i in top[:n_examples]], examples=examples))
    return pl.DataFrame(
        rows,
        schema={
            "feature": pl.Int64, "description": pl.Utf8, "more": pl.List(pl.Utf8), "less": pl.List(pl.Utf8),
            "win_rate_active": pl.Float64, "top_pair_ids": pl.List(pl.Utf8), "examples": pl.List(pl.Utf8),
        },
    )


# ====================================================================== pipeline
def _unique_rows(x: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    """Rows of ``x`` with the first occurrence of each key kept."""
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        seen.setdefault(key, i)
    return x[sorted(seen.values())]


def _check_input(differences: np.ndarray, n_unique_train: int, settings: FeatureSettings) -> None:
    if settings.k < 1 or settings.k > settings.n_features:
        raise CurateError(f"k={settings.k} must be between 1 and the number of features ({settings.n_features}): lower --k")
    needed = 2 * settings.n_features
    if n_unique_train < needed:
        raise CurateError(
            f"only {n_unique_train} distinct training pairs for a {settings.n_features}-feature dictionary "
            f"(need at least {needed}): add pairs or lower --n-features to at most {max(1, n_unique_train // 2)}"
        )
    if float(np.abs(differences).max(initial=0.0)) < 1e-6:
        raise CurateError(
            "every pair's chosen and rejected embeddings are identical, so there is nothing to learn: "
            "check that the replies differ, or use another --embedder"
        )


def compute_features(pairs: pl.DataFrame, *, settings: FeatureSettings | None = None,
                     embeddings: tuple[np.ndarray, np.ndarray] | None = None, cache_dir: str | Path | None = None,
                     show_progress: bool = False) -> FeatureResult:
    """Run WIMHF on a pair table: embed, train the signed SAE, describe and test each feature.

    ``embeddings`` may pass precomputed (e_chosen, e_rejected) arrays [n, d];
    otherwise replies are embedded with ``settings.embedder``
    (:func:`curate.embeddings.embed_texts`, cached in ``cache_dir``).

    Prompts are split into train / validation (``settings.val_fraction``).
    The SAE trains on the de-duplicated, +/- augmented training differences
    and early-stops on the validation differences; it never sees a label.
    Per-feature statistics use all pairs. The whole-set AUCs are validation
    AUCs of out-of-fold predictions (``settings.cv_folds`` folds grouped by
    prompt), so every pair is scored by a regression that never saw its label.
    """
    from curate import sae as sae_lib
    from curate.models import resolve_device

    settings = settings or FeatureSettings()
    device = str(resolve_device(settings.device))
    timings: dict[str, float] = {}
    n = pairs.height
    if n == 0:
        raise CurateError("no pairs to analyse: load a dataset with at least a few hundred pairs")
    chosen, rejected = pairs["chosen"].to_list(), pairs["rejected"].to_list()
    pair_ids = pairs["pair_id"].to_list()

    start = time.perf_counter()
    if embeddings is None:
        from curate.embeddings import embed_texts

        vectors = embed_texts(chosen + rejected, model=settings.embedder, device=device,
                              cache_dir=cache_dir, show_progress=show_progress)
        e_chosen, e_rejected = vectors[:n], vectors[n:]
    else:
        e_chosen, e_rejected = (np.asarray(e, dtype=np.float32) for e in embeddings)
    timings["embed_s"] = time.perf_counter() - start
    if e_chosen.shape != e_rejected.shape or len(e_chosen) != n:
        raise CurateError(f"embeddings must be two [{n}, d] arrays, got {e_chosen.shape} and {e_rejected.shape}")
    differences = e_chosen - e_rejected  # chosen - rejected

    # pairs sharing a prompt or a reply stay on one side of every split (curate.folds)
    from curate.folds import pair_groups

    fold_groups, grouping = pair_groups(pairs)
    prompt_keys = [str(g) for g in fold_groups]
    is_val = split_by_group(prompt_keys, settings.val_fraction, settings.seed)
    reply_keys = ["\x00".join(sorted((c, r))) for c, r in zip(chosen, rejected)]
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    train_unique = _unique_rows(differences[train_idx], [reply_keys[i] for i in train_idx])
    val_unique = _unique_rows(differences[val_idx], [reply_keys[i] for i in val_idx]) if val_idx.size else None
    _check_input(differences, len(train_unique), settings)

    start = time.perf_counter()
    trained = sae_lib.train_signed_sae(
        signed_augment(train_unique),
        None if val_unique is None else signed_augment(val_unique),
        n_features=settings.n_features, k=settings.k, prefixes=settings.prefixes, batch_size=settings.batch_size,
        lr=settings.lr, max_epochs=settings.max_epochs, min_epochs=settings.min_epochs, patience=settings.patience,
        seed=settings.seed, device=device,
    )
    timings["sae_s"] = time.perf_counter() - start

    start = time.perf_counter()
    acts_canonical = sae_lib.encode(trained.sae, differences)
    orientation = random_orientation(n, settings.seed)  # +1: A = chosen
    acts_oriented = sae_lib.encode(trained.sae, differences * orientation[:, None].astype(np.float32))
    length_diff = (word_count(chosen) - word_count(rejected)) * orientation
    a_chosen = (orientation > 0).astype(np.float64)

    effects = feature_effects(acts_oriented, length_diff, a_chosen)
    descriptions = describe_features(acts_canonical, chosen, rejected, pair_ids, top_fraction=settings.top_fraction,
                                     n_examples=settings.n_examples, n_ngrams=settings.n_ngrams)
    table = effects.join(descriptions, on="feature").sort("feature")
    timings["describe_s"] = time.perf_counter() - start

    start = time.perf_counter()
    folds = group_folds(prompt_keys, settings.cv_folds, settings.seed)
    aucs = _whole_set_aucs(acts_oriented, differences * orientation[:, None], length_diff, a_chosen, folds)
    timings["auc_s"] = time.perf_counter() - start

    summary = {
        **aucs,
        "n_pairs": n,
        "n_sae_train_pairs": int(train_idx.size),
        "n_sae_val_pairs": int(val_idx.size),
        "auc_method": f"{settings.cv_folds}-fold cross-fitted logistic regressions, folds {grouping}; "
        "each pair is scored by a model that never saw its label",
        "n_sae_training_rows": int(2 * len(train_unique)),
        "sae": {
            "architecture": "matryoshka-abstopk (sae-lens AbsTopK, signed)",
            "best_epoch": trained.best_epoch,
            "epochs_run": trained.epochs_run,
            "val_mse": trained.history["val_mse"][trained.best_epoch - 1] if trained.best_epoch else None,
            "input_mean_sq_norm": float(np.mean(np.sum(train_unique**2, axis=1))),
            "dead_features": int(np.sum(np.all(acts_canonical == 0, axis=0))),
        },
        "embedder": settings.embedder if embeddings is None else "precomputed",
        "settings": {**asdict(settings), "prefixes": list(settings.prefixes)},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    activations = pl.DataFrame({"pair_id": pair_ids}).with_columns(
        [pl.Series(f"sae_f{j}", acts_canonical[:, j]) for j in range(acts_canonical.shape[1])]
    )
    return FeatureResult(table=table, summary=summary, activations=activations, sae=trained.sae)


def _whole_set_aucs(acts, probe, length_diff, y, folds) -> dict[str, Any]:
    n_folds = len(np.unique(folds))
    smallest = min(np.bincount(folds)) if n_folds else 0
    if n_folds < 2 or smallest < 5 or len(set(y)) < 2:
        return {"auc_note": f"too few pairs ({len(y)}) for cross-fitted AUCs: add pairs or lower --cv-folds",
                "auc_sae": None, "auc_sae_only": None, "auc_probe": None, "auc_probe_length": None,
                "auc_length": None, "signal_fraction": None, "signal_fraction_beyond_length": None}
    length = length_diff[:, None]
    result = {
        "auc_sae": cross_fitted_auc(np.column_stack([acts, length]), y, folds),
        "auc_sae_only": cross_fitted_auc(acts, y, folds),
        "auc_probe": cross_fitted_auc(probe, y, folds, PROBE_CS),
        "auc_probe_length": cross_fitted_auc(np.column_stack([probe, length]), y, folds, PROBE_CS),
        "auc_length": cross_fitted_auc(length, y, folds),
    }
    result.update(signal_fractions(result["auc_sae"], result["auc_probe"], result["auc_probe_length"], result["auc_length"]))
    return result


# ====================================================================== run directory
def run_features(run: str | Path, *, dataset: str | None = None, settings: FeatureSettings | None = None,
                 load_kwargs: dict[str, Any] | None = None, show_progress: bool = False) -> FeatureResult:
    """``curate features``: analyse RUN's pairs (loading ``dataset`` into RUN first if given).

    Writes RUN/features.parquet, RUN/features_summary.json, RUN/sae/ (a
    sae-lens SAE), the ``sae_f{j}`` columns of RUN/scores.parquet and the
    ``features`` section of the manifest.
    """
    from curate.rundir import (FEATURES_SUMMARY, FEATURES_TABLE, PAIRS, SAE_DIR, SCORES, FeaturesSection, RunDir,
                               resolve_pairs, write_json, write_parquet)
    from curate.sae import save_sae

    settings = settings or FeatureSettings()
    rundir = RunDir(run)
    if dataset is not None:
        loaded = resolve_pairs(dataset, **(load_kwargs or {}))
        rundir.adopt_pairs(loaded.pairs, loaded.quarantine, source=str(dataset))
    elif not rundir.exists(PAIRS):
        raise CurateError(f"{rundir.path} has no {PAIRS}: pass --dataset to load pairs into it")
    pairs = rundir.pairs()

    result = compute_features(pairs, settings=settings, cache_dir=rundir / "cache", show_progress=show_progress)
    save_sae(result.sae, rundir / SAE_DIR)
    write_parquet(result.table, rundir / FEATURES_TABLE)
    write_json(result.summary, rundir / FEATURES_SUMMARY)
    # Replace every earlier sae_f* column, also ones from a larger dictionary.
    stale = [c for c in rundir.scores().columns if c.startswith("sae_f") and c not in result.activations.columns]
    if stale:
        write_parquet(rundir.scores().drop(stale), rundir / SCORES)
    rundir.merge_scores(result.activations)
    rundir.write_section(FeaturesSection(
        embedder=result.summary["embedder"], settings=result.summary["settings"],
        columns=[c for c in result.activations.columns if c != "pair_id"], sae_dir=SAE_DIR,
        timings_s=result.summary["timings_s"]))
    return result


def top_pairs(run: str | Path, feature: int, n: int = 10, sign: str = "positive") -> pl.DataFrame:
    """The ``n`` pairs where feature ``feature`` is strongest, from RUN/scores.parquet.

    ``sign="positive"``: largest activations (the chosen reply has more of the
    feature); ``"negative"``: most negative (the rejected reply has more);
    ``"abs"``: largest magnitude. Returns pair_id, chosen, rejected and the activation.
    """
    from curate.rundir import RunDir

    if sign not in ("positive", "negative", "abs"):
        raise CurateError(f"sign must be 'positive', 'negative' or 'abs', not {sign!r}")
    rundir = RunDir(run)
    scores = rundir.scores()
    columns = sorted((c for c in scores.columns if re.fullmatch(r"sae_f\d+", c)), key=lambda c: int(c[5:]))
    if not columns:
        raise CurateError(f"{rundir.path} has no SAE features yet: run `curate features {rundir.path}` first")
    column = f"sae_f{feature}"
    if column not in scores.columns:
        raise CurateError(f"feature {feature} does not exist: {rundir.path} has features 0..{len(columns) - 1}")
    act = pl.col(column)
    key = {"positive": act, "negative": -act, "abs": act.abs()}[sign]
    ranked = scores.select("pair_id", column).filter(key > 0).sort(key, descending=True).head(n)
    return ranked.join(rundir.pairs().select("pair_id", "chosen", "rejected"), on="pair_id", how="left").rename(
        {column: "activation"}
    )
