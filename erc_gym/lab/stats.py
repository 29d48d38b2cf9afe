"""Statistics over seeds: interquartile mean, percentile bootstrap, probability of improvement.

They follow rliable (Agarwal et al., NeurIPS 2021): the interquartile mean (IQM, the mean of the
middle 50% of runs), percentile-bootstrap confidence intervals over runs (each group resampled
separately, i.e. stratified by group), and the probability of improvement
``P(X > Y) + P(X = Y) / 2`` (the Mann-Whitney U statistic over ``n_x * n_y``). They are written
with numpy here because the ``rliable`` package pulls ``arch`` (with ``statsmodels``), ``scipy``,
``pandas`` and ``seaborn`` into a library that needs none of them, for a few short formulas.

Non-finite values (a run that logged no score) are left out of every statistic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "bootstrap_ci",
    "diff_ci",
    "finite",
    "finite_mean",
    "iqm",
    "mean_curve",
    "probability_of_improvement",
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
