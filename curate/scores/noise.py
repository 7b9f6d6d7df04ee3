"""Label-noise (flip) estimators for preference pairs: pure functions of arrays.

Conventions. Every pair carries the label "chosen beats rejected". The inputs
are per-pair, out-of-fold scores in the chosen-minus-rejected direction:

- ``margin`` s_i: an ensemble margin on a logit-like scale (monotone in how
  strongly the features favour the chosen reply),
- ``q`` q_i: a probability *learned from the (possibly noisy) labels* that the
  chosen reply is the one labelled chosen: the **noisy** posterior.

The identity behind the estimators (symmetric, instance-independent noise with
flip rate eps): a model fit on noisy labels estimates

    q(x) = eps + (1 - 2 eps) p(x),

where p(x) is the *clean* probability that the chosen reply is better. Such
probabilities already contain the noise, so an estimator that treats q as a
clean p finds almost none (``em_flip`` on q shows it). Genuine ambiguity
(p near 1/2) and label noise cannot be told apart without an assumption; each
estimator states its own in ``assumption``.

Every estimator returns a :class:`NoiseEstimate`: the dataset flip rate and a
per-pair ``flip_prob`` (a probability for the model-based estimators, a
ranking score for the heuristic ones). Estimators are registered by name in
:data:`ESTIMATORS` (one function each, decorated with :func:`register`, taking
``(margin, *, member_margins, seed)``). The default, ``DEFAULT_ESTIMATOR =
"mixture"`` (:func:`mixture_mle`), fits the noisy-label likelihood

    P(label | m) = eps + (1 - 2 eps) sigmoid(a m)

to the out-of-fold margins by maximum likelihood, tests eps = 0 with the
boundary-correct likelihood-ratio test and gives a 90% profile-likelihood
interval for eps. Its assumption: symmetric noise independent of the pair, and
a clean posterior logistic in the margin, reaching 0/1 for the surest pairs.
There is no intercept b: every label is "chosen", and swapping the replies
negates the margin, so P(clean | m) = 1 - P(clean | -m) forces b = 0 (a free b
would fit "every label is right" perfectly). With a weak ensemble the
likelihood is flat along a ridge of (eps, a): ambiguity and flips cannot be
told apart and the interval is wide; the estimate then says so
(``identifiable`` False).

Two per-pair probabilities come out. ``flip_prob`` is the posterior
P(flipped | m) averaged over eps with weights proportional to the profile
likelihood (a flat prior on [0, 1/2)): calibrated where the model holds, also
when the rate is only weakly identified (a plug-in at the MLE is not: at 1k
pairs it lands on eps = 0 for data with 30% flips). ``flip_prob_conservative``
is the posterior at the rate the data support (:attr:`NoiseEstimate.rate_used`:
the MLE when identifiable, else the interval's lower end): what actions read
(flip rules, soft labels, ``--epsilon auto``), so a weak ensemble does not
reverse or drop pairs on a rate the data cannot confirm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy.optimize import brentq, minimize, minimize_scalar
from scipy.special import expit, log_expit
from scipy.stats import chi2

from curate.errors import CurateError

DEFAULT_ESTIMATOR = "mixture"
# The per-pair column that curation rules, soft labels and --epsilon auto act on (see flip_prob_conservative).
ACTION_COLUMN = "flip_prob_conservative"
EPS_MAX = 0.499  # a flip rate of 1/2 means the labels carry no information
# Clean posteriors recovered by inverting the identity are kept in [P_FLOOR, 1 - P_FLOOR]:
# logit(p) stays within +-4.6 (MADPO weights read it as a margin) instead of +-13.8 at 1e-6.
P_FLOOR = 0.01
INTERVAL_LEVEL = 0.90
# Boundary null eps = 0: the LR statistic is 1/2 chi2_0 + 1/2 chi2_1, whose 95% point is
# chi2_1's 90% point, 2.71 (not chi2_1's 95% point, 3.84).
LR_CRITICAL = float(chi2.ppf(0.90, 1))
# A 90% interval wider than this does not pin the rate down: flip_prob then uses its lower end.
IDENTIFIABLE_WIDTH = 0.15


@dataclass
class NoiseEstimate:
    name: str
    rate: float
    flip_prob: np.ndarray
    p_clean: np.ndarray  # the estimator's clean posterior that the chosen reply is better
    assumption: str
    details: dict[str, Any] = field(default_factory=dict)
    interval: tuple[float, float] | None = None  # 90% interval for the rate, where the estimator gives one
    identifiable: bool | None = None  # whether the data pin the rate down (None: the estimator cannot tell)
    rate_used: float | None = None  # the rate flip_prob_conservative is computed at (default: rate)
    flip_prob_conservative: np.ndarray | None = None  # what actions read (default: flip_prob)

    def __post_init__(self) -> None:
        if self.rate_used is None:
            self.rate_used = self.rate
        if self.flip_prob_conservative is None:
            self.flip_prob_conservative = self.flip_prob


ESTIMATORS: dict[str, Callable[..., NoiseEstimate]] = {}


def register(name: str) -> Callable[[Callable[..., NoiseEstimate]], Callable[..., NoiseEstimate]]:
    """Add an estimator ``fn(margin, *, member_margins=None, seed=0) -> NoiseEstimate`` under ``name``."""
    def add(fn: Callable[..., NoiseEstimate]) -> Callable[..., NoiseEstimate]:
        ESTIMATORS[name] = fn
        return fn
    return add


def get_estimator(name: str) -> Callable[..., NoiseEstimate]:
    if name not in ESTIMATORS:
        raise CurateError(f"unknown noise estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def with_action_column(frame):
    """``frame`` with :data:`ACTION_COLUMN`; a table that has only ``flip_prob`` (earlier runs, where
    flip_prob was the conservative posterior, or a user's own estimate) acts on that."""
    if ACTION_COLUMN in frame.columns or "flip_prob" not in frame.columns:
        return frame
    import polars as pl

    return frame.with_columns(pl.col("flip_prob").alias(ACTION_COLUMN))


# ------------------------------------------------------------------ the identity
def noisy_posterior(p: np.ndarray, eps: float) -> np.ndarray:
    """q = eps + (1 - 2 eps) p: the label posterior that clean posterior p implies."""
    return eps + (1.0 - 2.0 * eps) * np.asarray(p, dtype=float)


def clean_posterior(q: np.ndarray, eps: float) -> np.ndarray:
    """Invert the identity, p = (q - eps) / (1 - 2 eps), clipped to [P_FLOOR, 1 - P_FLOOR].

    The inversion sends every q below eps to 0 and above 1 - eps to 1; the
    floor keeps logit(p) finite and sane (+-4.6) for consumers that read it as a margin.
    """
    eps = min(float(eps), EPS_MAX)
    return np.clip((np.asarray(q, dtype=float) - eps) / (1.0 - 2.0 * eps), P_FLOOR, 1.0 - P_FLOOR)


def flip_posterior(p: np.ndarray, eps: float) -> np.ndarray:
    """P(label is flipped | clean posterior p, flip rate eps), by Bayes.

    = eps (1 - p) / (eps (1 - p) + (1 - eps) p): one minus RE-PO's E-step weight.
    """
    p = np.asarray(p, dtype=float)
    wrong = eps * (1.0 - p)
    right = (1.0 - eps) * p
    return wrong / np.maximum(wrong + right, 1e-300)


# ------------------------------------------------------------------ the default: noisy-logistic MLE
def _noisy_nll(s: np.ndarray, eps: float, slope: float) -> float:
    """-sum log[eps + (1 - 2 eps) sigmoid(slope s)], computed stably for eps = 0."""
    if eps <= 0.0:
        return float(-log_expit(slope * s).sum())
    return float(-np.log(eps + (1.0 - 2.0 * eps) * expit(slope * s)).sum())


def profile_nll(margin: np.ndarray, eps: float) -> tuple[float, float]:
    """min over the slope a of the negative log-likelihood at fixed eps: (nll, a)."""
    s = np.asarray(margin, dtype=float)
    log_scale = -np.log(s.std() + 1e-12)
    res = minimize_scalar(lambda la: _noisy_nll(s, eps, np.exp(la)), bounds=(log_scale - 8.0, log_scale + 8.0),
                          method="bounded", options={"xatol": 1e-6})
    return float(res.fun), float(np.exp(res.x))


@dataclass
class NoisyLogisticFit:
    eps: float
    slope: float
    interval: tuple[float, float]
    lr_statistic: float  # 2 [NLL(eps = 0) - NLL(eps hat)], profiled over the slope
    p_value: float  # under the boundary null 1/2 chi2_0 + 1/2 chi2_1
    grid: np.ndarray  # eps values of the profile
    profile: np.ndarray  # min over the slope of the NLL at each grid eps
    grid_slopes: np.ndarray  # the slope that attains it

    def posterior_weights(self) -> np.ndarray:
        """Weights of the grid's eps under a flat prior: proportional to the profile likelihood."""
        w = np.exp(-(self.profile - self.profile.min()))
        return w / w.sum()

    def posterior_mean(self) -> float:
        return float(self.posterior_weights() @ self.grid)

    def averaged_flip_prob(self, margin: np.ndarray) -> np.ndarray:
        """P(flipped | m) averaged over eps with the posterior weights (slope profiled at each eps)."""
        s = np.asarray(margin, dtype=float)
        out = np.zeros_like(s)
        for w, eps, slope in zip(self.posterior_weights(), self.grid, self.grid_slopes):
            if w > 1e-12:
                out += w * flip_posterior(expit(slope * s), eps)
        return out

    @property
    def width(self) -> float:
        return self.interval[1] - self.interval[0]


def fit_noisy_logistic_profile(margin: np.ndarray, *, level: float = INTERVAL_LEVEL, grid_step: float = 0.005) -> NoisyLogisticFit:
    """Maximum likelihood of eps in P(label | m) = eps + (1 - 2 eps) sigmoid(a m), with a profile interval.

    The profile NLL(eps) = min_a NLL(eps, a) is evaluated on a grid of eps in
    [0, EPS_MAX] and refined around its minimum; the interval is
    {eps : 2 [NLL(eps) - NLL(eps hat)] <= chi2_1 quantile at ``level``} (2.71
    at 90%), the connected piece around eps hat, with end points by root
    finding. At the boundary eps = 0 this covers the truth 95% of the time
    (the statistic's null there is 1/2 chi2_0 + 1/2 chi2_1).
    """
    s = np.asarray(margin, dtype=float)
    if len(s) < 2 or not np.isfinite(s).all() or s.std() == 0:
        raise CurateError("the noise fit needs finite margins that vary across at least two pairs; add pairs")
    grid = np.arange(0.0, EPS_MAX, grid_step)
    prof, grid_slopes = np.array([profile_nll(s, e) for e in grid]).T
    k = int(np.argmin(prof))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    refined = minimize_scalar(lambda e: profile_nll(s, e)[0], bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-5})
    eps_hat, nll_hat = (float(refined.x), float(refined.fun)) if refined.fun < prof[k] else (float(grid[k]), float(prof[k]))
    nll_hat = min(nll_hat, float(prof.min()))
    _, slope = profile_nll(s, eps_hat)
    cut = float(chi2.ppf(level, 1))
    excess = lambda e: 2.0 * (profile_nll(s, e)[0] - nll_hat) - cut  # noqa: E731

    low = 0.0
    for j in range(k, -1, -1):  # walk down from the minimum to the first grid point outside
        if 2.0 * (prof[j] - nll_hat) > cut:
            low = float(brentq(excess, grid[j], max(eps_hat, grid[min(j + 1, k)]), xtol=1e-5))
            break
    high = float(EPS_MAX)
    for j in range(k, len(grid)):
        if 2.0 * (prof[j] - nll_hat) > cut:
            high = float(brentq(excess, min(eps_hat, grid[max(j - 1, k)]), grid[j], xtol=1e-5))
            break
    lr = max(0.0, 2.0 * (prof[0] - nll_hat))
    return NoisyLogisticFit(eps_hat, slope, (min(low, eps_hat), max(high, eps_hat)), float(lr),
                            float(0.5 * chi2.sf(lr, 1)) if lr > 0 else 1.0, grid, prof, grid_slopes)


@register("mixture")
def mixture_mle(margin: np.ndarray, *, member_margins: np.ndarray | None = None, seed: int = 0) -> NoiseEstimate:
    """Default. Noisy-logistic maximum likelihood with a 90% profile interval and the boundary LR test.

    ``rate`` is the MLE; ``interval`` its 90% profile-likelihood interval;
    ``identifiable`` is True when the interval is at most IDENTIFIABLE_WIDTH
    wide. ``flip_prob`` is eps (1 - p) / (eps (1 - p) + (1 - eps) p),
    p = sigmoid(a m), averaged over eps by the profile likelihood (the slope
    profiled at each eps). ``flip_prob_conservative`` is the same posterior at
    ``rate_used`` alone: the MLE when identifiable, else the interval's lower
    end, what curation, soft labels and ``--epsilon auto`` read.
    """
    s = np.asarray(margin, dtype=float)
    fit = fit_noisy_logistic_profile(s)
    identifiable = fit.width <= IDENTIFIABLE_WIDTH
    used = fit.eps if identifiable else fit.interval[0]
    slope = fit.slope if identifiable else profile_nll(s, used)[1]
    p = expit(slope * s)
    return NoiseEstimate(
        name="mixture", rate=fit.eps, flip_prob=fit.averaged_flip_prob(s),
        flip_prob_conservative=flip_posterior(p, used), p_clean=p,
        assumption=("symmetric noise independent of the pair, and a clean posterior that is logistic "
                    "in the out-of-fold margin (reaching 0/1 for the most confident pairs)"),
        details={"slope": slope, "lr_statistic": fit.lr_statistic, "no_noise_p_value": fit.p_value,
                 "no_noise_rejected": fit.lr_statistic > LR_CRITICAL, "interval_level": INTERVAL_LEVEL,
                 "identifiable_width": IDENTIFIABLE_WIDTH, "rate_posterior_mean": fit.posterior_mean()},
        interval=fit.interval, identifiable=identifiable, rate_used=used,
    )


def fit_noisy_logistic(margin: np.ndarray) -> tuple[float, float]:
    """(eps, a) of the maximum-likelihood noisy-logistic fit (see :func:`fit_noisy_logistic_profile`)."""
    fit = fit_noisy_logistic_profile(margin)
    return fit.eps, fit.slope


# ------------------------------------------------------------------ other estimators
@register("em")
def em_estimator(margin: np.ndarray, *, member_margins: np.ndarray | None = None, seed: int = 0,
                 top_fraction: float = 0.1) -> NoiseEstimate:
    """EM (LCPO / RE-PO) fed clean posteriors recovered with the identity.

    p = (q - eps_anchor) / (1 - 2 eps_anchor), q the Platt probability of the
    margin, eps_anchor from :func:`anchor_rate`.
    """
    eps_anchor = anchor_rate(margin, top_fraction=top_fraction).rate
    return _em_estimate("em", clean_posterior(platt_probability(margin), eps_anchor),
                        "the anchor-corrected probabilities are the clean posterior; then EM is the maximum "
                        "likelihood label accuracy (inherits the anchor's assumption)", eps_anchor=eps_anchor)


def _em_estimate(name: str, p: np.ndarray, assumption: str, **details: Any) -> NoiseEstimate:
    """:func:`em_flip` on the posteriors ``p`` as an estimate."""
    eps, flip = em_flip(p)
    return NoiseEstimate(name=name, rate=eps, flip_prob=flip, p_clean=p, assumption=assumption, details=details)


@register("anchor")
def anchor_rate(margin: np.ndarray, *, member_margins: np.ndarray | None = None, seed: int = 0,
                top_fraction: float = 0.1) -> NoiseEstimate:
    """Anchor estimator: the flip rate among the pairs the ensemble is surest about.

    Among the ``top_fraction`` of pairs with the largest |margin| the clean
    posterior is assumed to be ~0 or ~1 (anchor points), so by the identity
    their label agrees with the margin's sign with probability 1 - eps:
    eps = fraction of those pairs whose margin is negative. flip_prob is the
    Bayes posterior with p from inverting the identity on a Platt fit of q.
    """
    s = np.asarray(margin, dtype=float)
    k = max(1, int(round(top_fraction * len(s))))
    top = np.argsort(-np.abs(s))[:k]
    eps = float(np.clip((s[top] < 0).mean(), 0.0, EPS_MAX))
    p = clean_posterior(platt_probability(s), eps)
    return NoiseEstimate(
        name="anchor", rate=eps, flip_prob=flip_posterior(p, eps), p_clean=p,
        assumption=(f"the {top_fraction:.0%} most confident pairs are unambiguous (clean posterior 0 or 1) "
                    "and noise is independent of the pair; biased upward if they are not"),
        details={"top_fraction": top_fraction, "n_anchor": k},
    )


@register("cleanlab")
def confident_learning_estimator(margin: np.ndarray, *, member_margins: np.ndarray | None = None,
                                 seed: int = 0) -> NoiseEstimate:
    """cleanlab confident learning on the Platt probabilities of the margin (:func:`confident_learning`)."""
    return confident_learning(platt_probability(margin), seed=seed)


def confident_learning(q: np.ndarray, *, seed: int = 0) -> NoiseEstimate:
    """cleanlab confident learning on randomly oriented pairs.

    Each pair is shown as (A, B) in random order with label "A is chosen" and
    pred_probs [1 - q_A, q_A] from out-of-fold probabilities (without the
    random orientation every label is the same class and cleanlab finds
    nothing). eps = 1 - trace of cleanlab's estimated joint of (given, true)
    labels. flip_prob = 1 - q, the complement of cleanlab's self-confidence
    label-quality score (a ranking score).
    """
    from cleanlab.count import estimate_joint, num_label_issues

    q = np.clip(np.asarray(q, dtype=float), 1e-6, 1 - 1e-6)
    a_is_chosen = random_orientation(len(q), seed)
    labels = a_is_chosen.astype(int)
    p_a = np.where(a_is_chosen, q, 1.0 - q)
    pred_probs = np.stack([1.0 - p_a, p_a], axis=1)
    if labels.min() == labels.max():
        raise CurateError("confident learning needs pairs shown in both orientations: too few pairs; add pairs")
    joint = estimate_joint(labels, pred_probs)
    n_issues = num_label_issues(labels, pred_probs, estimation_method="off_diagonal_calibrated")
    return NoiseEstimate(
        name="cleanlab", rate=float(1.0 - np.trace(joint)), flip_prob=1.0 - q, p_clean=q,
        assumption=("out-of-fold probabilities rank and threshold pairs well per class; treats "
                    "the noisy posterior as if clean, so genuine ambiguity counts as noise (biased upward)"),
        details={"label_issue_fraction": float(n_issues) / len(q), "seed": seed},
    )


@register("margin")
def margin_heuristic(margin: np.ndarray, *, member_margins: np.ndarray | None = None, seed: int = 0) -> NoiseEstimate:
    """Secrets of RLHF II: eps = fraction of pairs whose mean member margin is < 0.

    ``member_margins`` is [n_pairs, n_members] on one scale (default: the
    margin as one member). flip_prob is the fraction of members voting against
    the label (a ranking score, ties broken by the mean margin).
    """
    d = np.asarray(margin if member_margins is None else member_margins, dtype=float)
    d = d[:, None] if d.ndim == 1 else d
    mean = d.mean(axis=1)
    against = (d < 0).mean(axis=1)
    tiebreak = 1e-6 * expit(-mean / (np.abs(mean).max() + 1e-12))
    return NoiseEstimate(
        name="margin", rate=float((mean < 0).mean()), flip_prob=np.clip(against + tiebreak, 0.0, 1.0),
        p_clean=1.0 - against,
        assumption=("every pair whose ensemble margin is negative is mislabelled; biased upward "
                    "by reward-model error (a weak ensemble calls many correct pairs flipped)"),
    )


@register("em_naive")
def em_naive(margin: np.ndarray, *, member_margins: np.ndarray | None = None, seed: int = 0) -> NoiseEstimate:
    """EM fed the noisy-label (Platt) probabilities as if clean: shown only as a warning baseline."""
    return _em_estimate("em_naive", platt_probability(margin),
                        "(wrong on purpose) probabilities learned from the noisy labels are clean; underestimates")


# ------------------------------------------------------------------ helpers
def random_orientation(n: int, seed: int = 0) -> np.ndarray:
    """A coin per pair: True where the chosen reply is shown as response "A"."""
    return np.random.default_rng(seed).random(n) < 0.5


def platt_slope(margin: np.ndarray) -> float:
    """The a of one-parameter Platt scaling q = sigmoid(a s), fit to the labels.

    The labels are all "chosen" and the model has no intercept (swapping the
    replies negates the margin), so the fit is max_a sum log sigmoid(a s_i).
    """
    s = np.asarray(margin, dtype=float)
    res = minimize(
        lambda v: -log_expit(v[0] * s).sum(), x0=[1.0 / (s.std() + 1e-12)],
        method="L-BFGS-B", bounds=[(0.0, None)],
    )
    return float(res.x[0])


def platt_probability(margin: np.ndarray) -> np.ndarray:
    """q = sigmoid(a s) with a from :func:`platt_slope`: the noisy-label posterior, calibrated."""
    s = np.asarray(margin, dtype=float)
    return expit(platt_slope(s) * s)


def em_flip(p_clean: np.ndarray, *, eta0: float = 0.9, tol: float = 1e-8, max_iter: int = 1000) -> tuple[float, np.ndarray]:
    """LCPO / RE-PO EM for the label accuracy eta given clean posteriors p.

    E-step: w_i = p_i eta / (p_i eta + (1 - p_i)(1 - eta)); M-step: eta = mean w.
    Returns (eps = 1 - eta, flip_prob = 1 - w). Only meaningful when p estimates
    the clean posterior; fed noisy-label probabilities it underestimates badly.
    """
    p = np.clip(np.asarray(p_clean, dtype=float), 0.0, 1.0)
    eta = float(eta0)
    w = np.full_like(p, eta)
    for _ in range(max_iter):
        w = p * eta / np.maximum(p * eta + (1.0 - p) * (1.0 - eta), 1e-300)
        new_eta = float(w.mean())
        if abs(new_eta - eta) < tol:
            eta = new_eta
            break
        eta = new_eta
    return 1.0 - eta, 1.0 - w


def estimate_all(
    margin: np.ndarray, member_margins: np.ndarray | None = None, *, seed: int = 0,
    names: "list[str] | None" = None,
) -> dict[str, NoiseEstimate]:
    """Every registered estimator (or ``names``) on one ensemble margin, keyed by name, default first."""
    margin = np.asarray(margin, dtype=float)
    names = names or [DEFAULT_ESTIMATOR] + [k for k in ESTIMATORS if k != DEFAULT_ESTIMATOR]
    return {name: get_estimator(name)(margin, member_margins=member_margins, seed=seed) for name in names}


def summary(estimate: NoiseEstimate) -> str:
    """One sentence on the rate, its interval and what flip_prob uses (for the CLI and the manifest)."""
    text = f"flip rate {estimate.rate:.3f}"
    if estimate.interval is not None:
        low, high = estimate.interval
        text += f" (90% interval {low:.3f}-{high:.3f})"
    if estimate.identifiable is False:
        text += (f"; the interval is wide: the ensemble cannot tell ambiguous pairs from flipped ones, so "
                 f"curation and training act on the interval's lower end {estimate.rate_used:.3f} "
                 "(flip_prob_conservative)")
    return text
