"""Paired / unpaired comparisons: honest null error rates, scipy agreement, Holm by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from erc_gym.lab import stats as S

# Per-seed scores shaped like the ones the docs compare (final returns / accuracies).
_CARTPOLE = np.array([500, 443, 208, 251, 182, 500, 423, 500, 500, 139.0])
_ACROBOT = np.array([-76, -84, -82, -88, -88, -76, -75, -78, -80, -76, -87, -86, -76, -80.0])


#: The null distributions of the false-positive checks (also tools/stats_null_rates.py).
NULL_SHAPES = ("normal", "cartpole", "acrobot", "accuracy")


def null_draws(shape: str, n: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """``(reps, n)`` per-seed scores of one null shape."""
    if shape == "normal":
        return rng.normal(0.0, 1.0, (reps, n))
    if shape == "cartpole":
        return rng.choice(_CARTPOLE, (reps, n))
    if shape == "acrobot":
        return rng.choice(_ACROBOT, (reps, n))
    p = rng.uniform(0.15, 0.4, (reps, n))  # accuracy on 25 held-out problems
    return rng.binomial(25, p) / 25


@pytest.mark.parametrize("shape", NULL_SHAPES)
def test_paired_interval_false_positive_rate_is_nominal_at_3_5_10_seeds(shape):
    rng = np.random.default_rng(123)
    reps = 20_000  # binomial SE of a 5% rate: 0.15 points
    for n in (3, 5, 10):
        a, b = null_draws(shape, n, reps, rng), null_draws(shape, n, reps, rng)
        _, lo, hi, p = S.paired_t(a, b)
        excludes = (lo > 0) | (hi < 0)
        rate = excludes.mean()
        assert rate <= 0.07, (shape, n, rate)
        assert rate >= 0.02, (shape, n, rate)  # not uselessly conservative either
        ok = np.isfinite(p)
        # the interval and the p-value are one test
        np.testing.assert_array_equal(excludes[ok], p[ok] < 0.05)


def test_the_old_bootstrap_interval_fails_the_same_check():
    """``diff_ci``, the percentile bootstrap the reports used before, is anti-conservative: the
    check above would fail on it (about 20% at 3 seeds, 10% at 5)."""
    rng = np.random.default_rng(7)
    reps = 300
    for n, floor in ((3, 0.12), (5, 0.07)):
        hits = 0
        for i in range(reps):
            a, b = rng.normal(size=n), rng.normal(size=n)
            _, lo, hi = S.diff_ci(a, b, statistic="mean", reps=1000, seed=i)
            hits += (lo > 0) or (hi < 0)
        assert hits / reps > floor, (n, hits / reps)


def test_compare_agrees_with_scipy_on_fixed_inputs():
    a = {0: 0.36, 1: 0.20, 2: 0.28, 3: 0.40, 4: 0.32}
    b = {0: 0.44, 1: 0.32, 2: 0.40, 3: 0.40, 4: 0.48}
    c = S.compare(a, b)
    x, y = np.array(list(a.values())), np.array(list(b.values()))
    ref = stats.ttest_rel(x, y)
    ci = ref.confidence_interval(0.95)
    assert c.paired and c.n == 5
    assert c.diff == pytest.approx((x - y).mean(), abs=1e-15)
    assert (c.ci_low, c.ci_high, c.p) == pytest.approx((ci.low, ci.high, ref.pvalue), rel=1e-12)
    # exact sign-flip: 4 negative differences and a zero -> 2 of 32 patterns as extreme
    assert c.p_exact == pytest.approx(
        stats.permutation_test(
            (x, y),
            lambda u, v, axis: np.mean(u - v, axis=axis),
            permutation_type="samples",
            vectorized=True,
            n_resamples=np.inf,
        ).pvalue
    )
    assert c.p_exact == pytest.approx(4 / 32)
    u = S.compare(list(a.values()), list(b.values()))
    ref_u = stats.ttest_ind(x, y, equal_var=False)
    ci_u = ref_u.confidence_interval(0.95)
    assert not u.paired
    assert (u.ci_low, u.ci_high, u.p) == pytest.approx((ci_u.low, ci_u.high, ref_u.pvalue))


def test_compare_pairs_only_shared_seeds_and_falls_back_to_unpaired():
    c = S.compare({0: 1.0, 1: 2.0, 2: 4.0, 9: 100.0}, {0: 0.0, 1: 1.0, 2: 2.0, 5: -5.0})
    assert c.paired and c.n == 3 and c.diff == pytest.approx(4 / 3)
    u = S.compare({0: 1.0, 1: 2.0}, {5: 0.0, 6: 1.0})
    assert not u.paired and u.diff == pytest.approx(1.0)
    flat = S.compare({0: 500.0, 1: 500.0, 2: 500.0}, {0: 9.0, 1: 9.0, 2: 9.0})
    # every pair differs by 491: t undefined, the exact sign-flip p (2 of 8) decides
    assert (flat.diff, flat.ci_low, flat.ci_high, flat.p) == (491.0, 491.0, 491.0, 0.25)
    same = S.compare({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0})
    assert same.p == 1.0 and same.p_exact == 1.0
    empty = S.compare({0: math.nan}, {0: 1.0})
    assert math.isnan(empty.p)


def test_holm_hand_case_and_bh_is_scipy():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> cummax
    np.testing.assert_allclose(S.holm(p), [0.03, 0.06, 0.06, 0.02, math.nan])
    np.testing.assert_allclose(
        S.benjamini_hochberg(p)[:4], stats.false_discovery_control(p[:4], method="bh")
    )
    cs = S.adjust([S.compare({0: 1.0, 1: 2.0, 2: 3.1}, {0: 0.0, 1: 0.1, 2: 0.0})] * 3)
    assert all(c.p_adjusted == pytest.approx(min(1.0, 3 * cs[0].p)) for c in cs)
    with pytest.raises(ValueError, match="holm"):
        S.adjust(cs, "bonferonni")


def test_sign_flip_floor_is_two_over_two_to_the_n():
    for n in (3, 5, 10):
        assert S.sign_flip_p(np.arange(1.0, n + 1)) == pytest.approx(2 / 2**n)
