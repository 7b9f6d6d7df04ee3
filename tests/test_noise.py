"""Noise-flip estimators: hand-computed values and known-answer simulations."""

import numpy as np
import pytest
from scipy.special import expit

from curate.scores import noise


def simulate_margins(n=4000, eps=0.15, scale=4.0, seed=0):
    """Margins s (chosen minus rejected) whose clean posterior is sigmoid(s_true), labels flipped at rate eps.

    Returns (margin seen from the labelled-chosen side, clean p of the labelled-chosen side, flipped mask).
    """
    rng = np.random.default_rng(seed)
    t = rng.normal(0.0, scale, n)  # margin of reply A over reply B
    a_better = rng.random(n) < expit(t)
    flipped = rng.random(n) < eps
    a_chosen = a_better ^ flipped
    margin = np.where(a_chosen, t, -t)
    return margin, expit(margin), flipped


def test_identity_and_its_inverse():
    p = np.array([0.0, 0.3, 1.0])
    q = noise.noisy_posterior(p, 0.2)
    np.testing.assert_allclose(q, [0.2, 0.2 + 0.6 * 0.3, 0.8])
    np.testing.assert_allclose(noise.clean_posterior(q, 0.2), [noise.P_FLOOR, 0.3, 1 - noise.P_FLOOR])
    assert noise.clean_posterior(np.array([0.1]), 0.2)[0] == noise.P_FLOOR  # clipped below eps


def test_clean_posterior_keeps_madpo_margins_sane():
    """logit of a clipped clean posterior stays within +-log(99) = 4.6, not +-13.8."""
    p = noise.clean_posterior(np.array([0.0, 0.05, 0.95, 1.0]), 0.1)
    margins = np.log(p / (1 - p))
    assert np.abs(margins).max() == pytest.approx(np.log(99), rel=1e-9)


def test_flip_posterior_by_hand():
    # p = 0.8, eps = 0.1: eps(1-p) / (eps(1-p) + (1-eps)p) = 0.02 / 0.74
    assert noise.flip_posterior(np.array([0.8]), 0.1)[0] == pytest.approx(0.02 / 0.74)
    assert noise.flip_posterior(np.array([0.5]), 0.3)[0] == pytest.approx(0.3)


def test_em_fixed_point_by_hand():
    # p = 1, 1 -> w = 1; p = 0 -> w = 0; p = 1/2 -> w = eta. eta = (2 + eta) / 4 -> eta = 2/3.
    eps, flip = noise.em_flip(np.array([1.0, 1.0, 0.0, 0.5]))
    assert eps == pytest.approx(1 / 3, abs=1e-6)
    np.testing.assert_allclose(flip, [0.0, 0.0, 1.0, 1 / 3], atol=1e-6)


def test_em_recovers_rate_from_clean_posteriors_and_not_from_noisy_ones():
    margin, p_clean, flipped = simulate_margins(eps=0.2)
    eps, _ = noise.em_flip(p_clean)
    assert eps == pytest.approx(flipped.mean(), abs=0.03)
    # the same EM fed the noisy posterior q = eps + (1 - 2 eps) p sees far less noise
    eps_naive, _ = noise.em_flip(noise.noisy_posterior(p_clean, 0.2))
    assert eps_naive < 0.1


def test_mixture_fit_recovers_eps_and_slope():
    margin, _, flipped = simulate_margins(eps=0.15, scale=4.0)
    eps, slope = noise.fit_noisy_logistic(margin)
    assert eps == pytest.approx(flipped.mean(), abs=0.03)
    assert slope == pytest.approx(1.0, rel=0.2)


@pytest.mark.parametrize("estimator", [noise.mixture_mle, noise.anchor_rate, noise.em_estimator])
def test_identity_estimators_on_a_strong_ensemble(estimator):
    margin, _, flipped = simulate_margins(eps=0.1, scale=6.0, seed=1)
    est = estimator(margin)
    assert est.rate == pytest.approx(flipped.mean(), abs=0.04)
    assert est.flip_prob.shape == margin.shape
    assert ((0 <= est.flip_prob) & (est.flip_prob <= 1)).all()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(flipped, est.flip_prob) > 0.85
    assert est.assumption


@pytest.mark.parametrize("estimator", [noise.mixture_mle, noise.anchor_rate, noise.em_estimator])
def test_planting_raises_the_rate_by_delta_times_one_minus_two_eps(estimator):
    """Flipping a random delta of pairs (negating their margins) adds delta (1 - 2 eps0)."""
    margin, _, _ = simulate_margins(n=6000, eps=0.1, scale=6.0, seed=2)
    eps0 = estimator(margin).rate
    rng = np.random.default_rng(5)
    planted = rng.permutation(len(margin)) < int(0.3 * len(margin))
    eps1 = estimator(np.where(planted, -margin, margin)).rate
    assert eps1 - eps0 == pytest.approx(0.3 * (1 - 2 * eps0), abs=0.04)


def test_margin_heuristic_by_hand():
    members = np.array([[1.0, 2.0], [-1.0, -3.0], [1.0, -3.0], [2.0, -1.0]])  # means 1.5, -2, -1, 0.5
    est = noise.margin_heuristic(members)
    assert est.rate == 0.5
    np.testing.assert_allclose(est.flip_prob, [0.0, 1.0, 0.5, 0.5], atol=1e-5)
    assert est.flip_prob[2] > est.flip_prob[3]  # ties broken by the mean margin


def test_confident_learning_uses_random_orientation():
    margin, p_clean, flipped = simulate_margins(eps=0.1, scale=8.0, seed=3)
    q = noise.noisy_posterior(p_clean, 0.1)
    est = noise.confident_learning(q, seed=0)
    assert est.rate == pytest.approx(flipped.mean(), abs=0.05)
    a = noise.random_orientation(len(q), 0)
    assert 0.45 < a.mean() < 0.55
    # the orientation is seeded: the same seed gives the same estimate
    assert noise.confident_learning(q, seed=0).rate == est.rate


def test_estimate_all_lists_every_estimator_default_first():
    margin, _, _ = simulate_margins(n=500)
    out = noise.estimate_all(margin)
    assert list(out)[0] == noise.DEFAULT_ESTIMATOR == "mixture"
    assert set(out) == set(noise.ESTIMATORS) >= {"em", "anchor", "mixture", "cleanlab", "margin", "em_naive"}
    for est in out.values():
        assert 0.0 <= est.rate <= 0.5
        assert len(est.p_clean) == len(margin)


def test_adding_an_estimator_is_one_registered_function():
    @noise.register("always_zero")
    def always_zero(margin, *, member_margins=None, seed=0):
        return noise.NoiseEstimate("always_zero", 0.0, np.zeros(len(margin)), np.ones(len(margin)), "no noise")

    try:
        out = noise.estimate_all(np.linspace(-2, 2, 50))
        assert out["always_zero"].rate == 0.0 and out["always_zero"].rate_used == 0.0
    finally:
        del noise.ESTIMATORS["always_zero"]
    with pytest.raises(Exception, match="unknown noise estimator 'always_zero'; choose one of mixture"):
        noise.get_estimator("always_zero")


def test_lr_critical_value_is_the_boundary_null_95_point():
    """eps = 0 is a boundary null: 1/2 chi2_0 + 1/2 chi2_1 exceeds 2.71 with probability 0.05."""
    from scipy.stats import chi2

    assert noise.LR_CRITICAL == pytest.approx(2.7055, abs=1e-4)
    assert 0.5 * chi2.sf(noise.LR_CRITICAL, 1) == pytest.approx(0.05)


def test_profile_nll_at_eps_zero_is_the_platt_fit():
    margin, _, _ = simulate_margins(n=800, eps=0.0, scale=2.0, seed=7)
    nll, slope = noise.profile_nll(margin, 0.0)
    assert slope == pytest.approx(noise.platt_slope(margin), rel=1e-3)
    assert nll == pytest.approx(-np.log(expit(slope * margin)).sum(), rel=1e-9)


def test_profile_interval_is_the_chi2_cut_of_the_profile():
    margin, _, flipped = simulate_margins(n=3000, eps=0.12, scale=4.0, seed=8)
    fit = noise.fit_noisy_logistic_profile(margin)
    low, high = fit.interval
    assert low < flipped.mean() < high
    best = noise.profile_nll(margin, fit.eps)[0]
    for end in (low, high):  # 2 [NLL(end) - NLL(eps hat)] = chi2_1 90% point at both ends
        assert 2 * (noise.profile_nll(margin, end)[0] - best) == pytest.approx(2.7055, abs=0.01)
    assert fit.lr_statistic > noise.LR_CRITICAL and fit.p_value < 0.05


def test_default_says_when_eps_is_not_identified_and_uses_the_lower_end():
    strong, _, flipped = simulate_margins(eps=0.15, scale=6.0, seed=4)
    est = noise.mixture_mle(strong)
    assert est.identifiable and est.rate_used == est.rate
    assert est.rate == pytest.approx(flipped.mean(), abs=0.03)
    assert est.details["no_noise_rejected"]
    # at the MLE the mean posterior flip probability is the rate (stationarity in eps)
    assert est.flip_prob.mean() == pytest.approx(est.rate, abs=2e-3)
    # a weak ensemble: labels follow sigmoid(0.3 s), no plateau, eps = 0 fits as well
    rng = np.random.default_rng(0)
    t = rng.normal(0, 1, 2000)
    weak = np.where(rng.random(2000) < expit(0.3 * t), t, -t)
    est = noise.mixture_mle(weak)
    low, high = est.interval
    assert low == 0.0 and high - low > noise.IDENTIFIABLE_WIDTH
    assert est.identifiable is False and est.rate_used == low
    assert not est.details["no_noise_rejected"]
    assert "interval is wide" in noise.summary(est)


def test_interval_covers_the_truth_in_repeated_simulations():
    """90% profile intervals of a correctly specified model: coverage near 0.9 (>= 0.8 over 40 draws)."""
    hits = []
    for seed in range(40):
        margin, _, flipped = simulate_margins(n=1000, eps=0.1, scale=3.0, seed=100 + seed)
        low, high = noise.mixture_mle(margin).interval
        hits.append(low <= 0.1 <= high)
    assert np.mean(hits) >= 0.8


def test_confident_learning_on_one_pair_is_a_clear_error():
    from curate.errors import CurateError

    with pytest.raises(CurateError, match="too few pairs"):
        noise.confident_learning(np.array([0.9]))


def test_averaged_flip_prob_by_hand():
    """Two grid points: weights are the normalised likelihoods exp(-NLL), the posterior their mixture."""
    fit = noise.NoisyLogisticFit(eps=0.1, slope=1.0, interval=(0.0, 0.3), lr_statistic=0.0, p_value=1.0,
                                 grid=np.array([0.1, 0.3]), profile=np.array([10.0, 10.0 + np.log(3.0)]),
                                 grid_slopes=np.array([1.0, 2.0]))
    assert fit.posterior_weights() == pytest.approx([0.75, 0.25])
    assert fit.posterior_mean() == pytest.approx(0.75 * 0.1 + 0.25 * 0.3)
    m = np.array([0.0, 1.0])
    # m = 0: p = 1/2 at both points, so P(flip) = eps: 0.75 * 0.1 + 0.25 * 0.3
    # m = 1: p = sigmoid(1) and sigmoid(2), P(flip) = eps (1 - p) / (eps (1 - p) + (1 - eps) p)
    by_hand_1 = 0.75 * (0.1 * expit(-1.0) / (0.1 * expit(-1.0) + 0.9 * expit(1.0))) \
        + 0.25 * (0.3 * expit(-2.0) / (0.3 * expit(-2.0) + 0.7 * expit(2.0)))
    assert fit.averaged_flip_prob(m) == pytest.approx([0.15, by_hand_1])


def test_flip_prob_stays_calibrated_when_the_rate_is_weakly_identified():
    """A weak ensemble and 25% flips over 30 draws of 800 pairs: the plug-in at the MLE lands near 0 on
    some draws (miscalibrated there); the likelihood-averaged flip_prob is closer to the flips on average,
    and the conservative posterior never exceeds what the interval's lower end supports."""
    plug_in_err, averaged_err = [], []
    for seed in range(30):
        margin, _, flipped = simulate_margins(n=800, eps=0.25, scale=1.5, seed=300 + seed)
        est = noise.mixture_mle(margin)
        fit = noise.fit_noisy_logistic_profile(margin)
        plug_in = noise.flip_posterior(expit(fit.slope * margin), fit.eps)
        plug_in_err.append(abs(plug_in.mean() - flipped.mean()))
        averaged_err.append(abs(est.flip_prob.mean() - flipped.mean()))
        low = est.interval[0]
        if not est.identifiable:
            assert est.rate_used == low
            assert est.flip_prob_conservative.mean() <= est.flip_prob.mean() + 1e-9
    assert np.mean(averaged_err) < np.mean(plug_in_err)
