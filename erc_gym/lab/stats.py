"""Statistics over seeds: comparisons with honest error rates, and rliable's summaries.

**Comparisons** (:func:`compare`, :func:`adjust`): a method against its baseline, paired by seed
where the seed is shared (a paired Student-t interval and p-value, and the exact sign-flip
p-value beside them), unpaired otherwise (Welch's t, a permutation p-value); Holm's or
Benjamini-Hochberg's adjustment over a family of comparisons. These decide what the reports call
significant. ``docs/statistics.md`` says why these and not a bootstrap, with the measured
false-positive rates at 3, 5 and 10 seeds; the tests and intervals are scipy's
(:mod:`scipy.stats`), except Holm's adjustment, which scipy does not ship.

**Summaries** follow rliable (Agarwal et al., NeurIPS 2021): the interquartile mean (IQM, the mean
of the middle 50% of runs), percentile-bootstrap bands over runs (:func:`bootstrap_ci`,
:func:`mean_curve`), and the probability of improvement ``P(X > Y) + P(X = Y) / 2`` (the
Mann-Whitney U statistic over ``n_x * n_y``). They are descriptive: with 3-5 seeds a percentile
bootstrap is too narrow (:func:`diff_ci` excluded 0 in about 20% of no-effect comparisons at 3
seeds), so no significance is read from them. They are written with numpy here because the
``rliable`` package pulls ``arch`` (with ``statsmodels``), ``pandas`` and ``seaborn`` into a
library that needs none of them, for a few short formulas.

Non-finite values (a run that logged no score) are left out of every statistic.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "ADJUSTMENTS",
    "EXACT_SIGN_FLIP_MAX",
    "SIGN_FLIP_DRAWS",
    "Comparison",
    "adjust",
    "benjamini_hochberg",
    "bootstrap_ci",
    "compare",
    "diff_ci",
    "finite",
    "finite_mean",
    "holm",
    "iqm",
    "mean_curve",
    "paired_t",
    "permutation_p",
    "probability_of_improvement",
    "sign_flip_p",
    "welch_t",
]


def finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """The finite values, as float64."""
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]


def finite_mean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of the finite values (NaN when there is none)."""
    x = finite(values)
    return float(x.mean()) if x.size else math.nan


def _iqm_rows(samples: np.ndarray) -> np.ndarray:
    """IQM of each row of a ``(reps, n)`` array of finite values: drop ``floor(n / 4)`` values
    at each end of the sorted row, average the rest."""
    x = np.sort(samples, axis=-1)
    cut = x.shape[-1] // 4
    return np.asarray(x[..., cut : x.shape[-1] - cut].mean(axis=-1))


def iqm(values: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean: drop ``floor(n / 4)`` values at each end, average the rest."""
    x = finite(values)
    if x.size == 0:
        return math.nan
    return float(_iqm_rows(x))


def _resample(x: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """``reps`` bootstrap resamples of the rows of ``x`` (drawn with replacement), stacked."""
    return x[rng.integers(0, len(x), size=(reps, len(x)))]


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[Sequence[float]], float] = iqm,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``statistic`` over ``values`` (runs)."""
    x = finite(values)
    if x.size == 0:
        return math.nan, math.nan
    samples = _resample(x, reps, np.random.default_rng(seed))
    # the IQM of every resample at once (the same numbers as one call per resample)
    stats = _iqm_rows(samples) if statistic is iqm else np.array([statistic(s) for s in samples])
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def _resampled(
    x: Sequence[float], y: Sequence[float], reps: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The finite values of ``x`` and ``y`` and ``reps`` bootstrap resamples of each (drawn
    separately, so the groups may differ in size); None when a group has no finite value."""
    a, b = finite(x), finite(y)
    if a.size == 0 or b.size == 0:
        return None
    rng = np.random.default_rng(seed)
    sa = _resample(a, reps, rng)
    sb = _resample(b, reps, rng)
    return a, b, sa, sb


def diff_ci(
    x: Sequence[float],
    y: Sequence[float],
    *,
    statistic: str = "iqm",
    reps: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``stat(x) - stat(y)`` and its 95% percentile-bootstrap CI (x and y resampled separately).

    Descriptive only: with few seeds this interval is too narrow (fed two groups from one
    distribution it excluded 0 in about 20% of draws at 3 seeds and 7-10% at 5, nominal 5%), and
    it ignores the pairing by seed. :func:`compare` is the test the reports use; this stays so
    that numbers of earlier reports can be reproduced.

    Args:
        x: per-seed values of the first group (e.g. with ERC).
        y: per-seed values of the second group (e.g. without ERC).
        statistic: ``iqm`` or ``mean``.
        reps: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``(difference, ci_low, ci_high)``; NaNs when a group has no finite value.
    """
    if statistic not in ("iqm", "mean"):
        raise ValueError(f"statistic must be 'iqm' or 'mean', got {statistic!r}")
    pair = _resampled(x, y, reps, seed)
    if pair is None:
        return math.nan, math.nan, math.nan
    a, b, sa, sb = pair
    if statistic == "iqm":
        point = iqm(a) - iqm(b)
        boot = _iqm_rows(sa) - _iqm_rows(sb)
    else:
        point = float(a.mean() - b.mean())
        boot = sa.mean(axis=1) - sb.mean(axis=1)
    return float(point), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def _poi(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(X > Y) + P(X = Y)/2 for the rows of resampled (reps, n) arrays."""
    gt = (a[:, :, None] > b[:, None, :]).mean(axis=(1, 2))
    eq = (a[:, :, None] == b[:, None, :]).mean(axis=(1, 2))
    return np.asarray(gt + 0.5 * eq)


def probability_of_improvement(
    x: Sequence[float], y: Sequence[float], *, reps: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Probability that a run of ``x`` scores above a run of ``y`` (ties count half), with CI.

    rliable's definition (the Mann-Whitney U statistic over ``n_x * n_y``), 95% percentile
    bootstrap resampling each group separately. 0.5 means no difference.

    Returns:
        ``(poi, ci_low, ci_high)``; NaNs when a group has no finite value.
    """
    pair = _resampled(x, y, reps, seed)
    if pair is None:
        return math.nan, math.nan, math.nan
    a, b, sa, sb = pair
    boot = _poi(sa, sb)
    point = float(_poi(a[None], b[None])[0])
    return point, float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def mean_curve(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], reps: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean across runs with a 95% bootstrap band, on the steps all runs share.

    Each curve is linearly interpolated onto the union of steps within the range every run
    covers. Returns ``(steps, mean, low, high)`` (empty arrays without data).
    """
    curves = [(x, y) for x, y in curves if x.size]
    if not curves:
        e = np.empty(0)
        return e, e, e, e
    lo_x = max(float(x.min()) for x, _ in curves)
    hi_x = min(float(x.max()) for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= lo_x) & (grid <= hi_x)]
    if grid.size == 0:
        e = np.empty(0)
        return e, e, e, e
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    mean = ys.mean(axis=0)
    if len(curves) == 1:
        return grid, mean, mean.copy(), mean.copy()
    boot = _resample(ys, reps, np.random.default_rng(seed)).mean(axis=1)
    return grid, mean, np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0)


# ---------------------------------------------------------------- comparisons

#: Largest number of pairs for which the sign-flip p-value enumerates all ``2**n`` sign patterns
#: (exact); above it, a seeded Monte Carlo of :data:`SIGN_FLIP_DRAWS` patterns.
EXACT_SIGN_FLIP_MAX = 16
#: Sign patterns (or splits) drawn for a Monte Carlo p-value above :data:`EXACT_SIGN_FLIP_MAX`.
SIGN_FLIP_DRAWS = 1 << 16


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b``: the mean difference, its interval and p-values.

    Attributes:
        diff: mean of ``a - b`` (paired: the mean of the per-seed differences).
        ci_low: lower end of the confidence interval of ``diff`` (Student t: paired, or
            Welch's).
        ci_high: its upper end.
        p: two-sided p-value of the same t-test (the interval excludes 0 exactly when
            ``p < 1 - confidence``).
        p_exact: two-sided p-value of the exact sign-flip test (paired) or permutation test
            (unpaired) of the mean difference: no normality assumed, but coarse with few seeds
            (never below ``2 / 2**n`` for ``n`` pairs).
        n: pairs (paired) or the smaller group's size (unpaired).
        paired: whether runs were matched by seed.
        p_adjusted: ``p`` after a multiple-comparison adjustment (:func:`adjust`), else NaN.
    """

    diff: float
    ci_low: float
    ci_high: float
    p: float
    p_exact: float
    n: int
    paired: bool
    p_adjusted: float = math.nan

    def significant(self, alpha: float = 0.05) -> bool:
        """``p_adjusted < alpha`` where an adjustment was made, else ``p < alpha``."""
        p = self.p if math.isnan(self.p_adjusted) else self.p_adjusted
        return bool(p < alpha)


def sign_flip_p(diffs: Sequence[float] | np.ndarray, *, seed: int = 0) -> float:
    """Two-sided p-value of the sign-flip (paired permutation) test of ``mean(diffs) = 0``.

    Under the null hypothesis that the two methods are exchangeable within a pair, each
    difference is as likely to have either sign, so the observed ``|mean|`` is compared with the
    means of all ``2**n`` sign patterns (:func:`scipy.stats.permutation_test` with
    ``permutation_type="samples"``; exact up to :data:`EXACT_SIGN_FLIP_MAX` pairs). The smallest
    attainable value is ``2 / 2**n``: 0.25 with 3 pairs, 0.0625 with 5, 0.002 with 10.
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    if not np.any(d):
        return 1.0
    res = stats.permutation_test(
        (d, np.zeros_like(d)),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=np.inf if d.size <= EXACT_SIGN_FLIP_MAX else SIGN_FLIP_DRAWS,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(min(1.0, res.pvalue))


def paired_t(
    a: np.ndarray, b: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paired Student t over the last axis: ``(mean diff, ci_low, ci_high, p)``, vectorised.

    :func:`scipy.stats.ttest_rel` on each row. Rows whose differences are all equal (no
    variance) get the degenerate interval ``[d, d]`` and p = 1 when ``d = 0``, else NaN (the t
    statistic is undefined; :func:`compare` then uses the exact sign-flip p).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = a - b
    mean = d.mean(axis=-1)
    # rows without variance are handled below; scipy warns about them ("catastrophic
    # cancellation") and returns inf / NaN
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(a, b, axis=-1)
        ci = res.confidence_interval(confidence)
    lo = np.asarray(ci.low, dtype=np.float64)
    hi = np.asarray(ci.high, dtype=np.float64)
    p = np.asarray(res.pvalue, dtype=np.float64)
    flat = np.all(d == d[..., :1], axis=-1)
    lo = np.where(flat, mean, lo)
    hi = np.where(flat, mean, hi)
    p = np.where(flat, np.where(mean == 0, 1.0, np.nan), p)
    return mean, lo, hi, p


def permutation_p(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, seed: int = 0
) -> float:
    """Two-sided p-value of the permutation test of equal means for unpaired groups.

    :func:`scipy.stats.permutation_test` with ``permutation_type="independent"`` (exact when the
    groups are small enough to enumerate every split, else a seeded Monte Carlo).
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if x.size == 0 or y.size == 0:
        return math.nan
    if np.all(np.concatenate([x, y]) == x[0]):
        return 1.0
    res = stats.permutation_test(
        (x, y),
        lambda u, v, axis: np.mean(u, axis=axis) - np.mean(v, axis=axis),
        permutation_type="independent",
        vectorized=True,
        n_resamples=SIGN_FLIP_DRAWS,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(min(1.0, res.pvalue))


def welch_t(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float, float]:
    """Welch's unequal-variance t for ``mean(a) - mean(b)``: ``(diff, ci_low, ci_high, p)``."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    diff = float(x.mean() - y.mean())
    if x.var() == 0 and y.var() == 0:
        return diff, diff, diff, (1.0 if diff == 0 else math.nan)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(x, y, equal_var=False)
        ci = res.confidence_interval(confidence)
    return diff, float(ci.low), float(ci.high), float(res.pvalue)


def compare(
    a: Mapping[int, float] | Sequence[float],
    b: Mapping[int, float] | Sequence[float],
    *,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """``a`` against ``b`` (e.g. a method against its baseline), paired by seed where possible.

    With mappings ``seed -> value`` on both sides, runs that share a seed are matched (a seed
    fixes the environment's randomness, the initial weights, the held-out split...), and the
    comparison is paired when at least two seeds with finite values are shared: the mean of the
    per-seed differences, a paired Student-t interval, and the exact sign-flip p. Otherwise
    (plain sequences, or fewer than two shared seeds) the groups are compared unpaired: Welch's
    interval and a permutation p.

    Why t and not a bootstrap: with 3-10 seeds a percentile bootstrap interval excludes 0 far
    more often than nominal when there is no effect (20% at 3 seeds, 7-10% at 5; see
    ``docs/statistics.md``); the t-interval of paired differences stays at its nominal rate
    there, for normal, capped-and-skewed (CartPole returns) and discrete (accuracy) scores alike,
    because under the null hypothesis a difference is as likely to be positive as negative. The
    sign-flip p beside it needs no distribution at all, but cannot go below ``2 / 2**n``.

    Returns:
        A :class:`Comparison`; NaN fields when a side has no finite value (or, unpaired, fewer
        than two).
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        shared = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
        if len(shared) >= 2:
            x = np.array([a[s] for s in sorted(shared)], dtype=np.float64)
            y = np.array([b[s] for s in sorted(shared)], dtype=np.float64)
            mean, lo, hi, p = (float(v) for v in paired_t(x, y, confidence))
            p_exact = sign_flip_p(x - y, seed=seed)
            if math.isnan(p):  # every pair differs by the same amount: t is undefined
                p = p_exact
            return Comparison(mean, lo, hi, p, p_exact, len(shared), True)
        a, b = list(a.values()), list(b.values())
    x = np.asarray(list(a), dtype=np.float64)
    y = np.asarray(list(b), dtype=np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    n = int(min(x.size, y.size))
    if n < 2:
        nan = math.nan
        diff = float(x.mean() - y.mean()) if n else nan
        return Comparison(diff, nan, nan, nan, nan, n, False)
    diff, lo, hi, p = welch_t(x, y, confidence)
    p_exact = permutation_p(x, y, seed=seed)
    if math.isnan(p):
        p = p_exact
    return Comparison(diff, lo, hi, p, p_exact, n, False)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (controls the family-wise error rate).

    Sort the ``m`` finite p-values ascending; the ``i``-th (from 1) becomes
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``. NaN entries stay NaN and do not count in ``m``.
    Written here because scipy ships only the false-discovery-rate procedures
    (:func:`scipy.stats.false_discovery_control`); a test checks it against a hand case.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), NaN entries kept.

    :func:`scipy.stats.false_discovery_control` over the finite entries.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


#: The multiple-comparison adjustments of :func:`adjust`, by name.
ADJUSTMENTS = {"holm": holm, "bh": benjamini_hochberg}


def adjust(comparisons: Sequence[Comparison], method: str = "holm") -> list[Comparison]:
    """The comparisons with ``p_adjusted`` filled over the whole family (``holm`` or ``bh``)."""
    if method not in ADJUSTMENTS:
        raise ValueError(f"method must be one of {sorted(ADJUSTMENTS)}, got {method!r}")
    adj = ADJUSTMENTS[method]([c.p for c in comparisons])
    return [
        dataclasses.replace(c, p_adjusted=float(q)) for c, q in zip(comparisons, adj, strict=True)
    ]
