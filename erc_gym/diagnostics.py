"""Entropy-dynamics diagnostics: the numbers that show what ERC does, for any policy-gradient run.

Pure functions over tensors or per-update series, shared by the experiment runner, the reports
and :class:`erc_gym.sb3.EntropyDynamicsCallback` (which logs them for any Stable-Baselines3
algorithm with a discrete action space):

* :func:`entropy_trend` and :func:`entropy_steepest_fall` -- how fast ``log`` mean entropy
  moves: the least-squares slope per update, and the largest one-update fall;
* :func:`entropy_jitter` -- how much it jitters around its trend (second differences, so a steady
  decline or rise of any speed has none);
* :func:`entropy_volatility` -- std of the per-update change of ``log`` mean entropy, which mixes
  the two above (a steadily falling curve with no jitter still scores high when its rate varies);
* :func:`grad_norm_spikes` -- updates whose gradient norm exceeds ``k`` x the running median;
* :func:`unsampled_drift` -- total variation on the actions *not* sampled in a state, the part of
  an update PPO-clip's sampled-action ratio cannot see;
* :func:`clipped_vs_kept_old_entropy` -- mean old entropy of the states ERC clipped and kept;
* :func:`ratio_histogram` -- counts of the entropy ratio on the fixed bins :data:`RATIO_EDGES`,
  one row per update, for heat maps over training.

All entropies are per state (per token for a language model) and in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

__all__ = [
    "RATIO_EDGES",
    "clipped_vs_kept_old_entropy",
    "entropy_jitter",
    "entropy_steepest_fall",
    "entropy_trend",
    "entropy_volatility",
    "grad_norm_spikes",
    "ratio_histogram",
    "unsampled_drift",
]

#: Bin edges of :func:`ratio_histogram`: 40 bins of width 0.01 over [0.8, 1.2]. Ratios outside
#: are counted in the first or last bin, so every state is counted once.
RATIO_EDGES: np.ndarray = np.round(np.linspace(0.8, 1.2, 41), 10)


def entropy_volatility(mean_entropy: Sequence[float] | np.ndarray) -> float:
    """Standard deviation of ``diff(log H_t)`` over updates ``t`` (population std).

    ``mean_entropy`` is the mean policy entropy after each update (one value per update). A
    decline at a constant rate gives 0 however steep it is; jumps up and down give a large value,
    but so does a decline whose rate changes (fast, then slow), so a lower value can mean a
    slower fall as well as less jitter: read it beside :func:`entropy_trend` and
    :func:`entropy_jitter`, which separate the two. NaN with fewer than three values;
    non-positive entropies are an error.
    """
    h = np.asarray(mean_entropy, dtype=np.float64)
    h = h[np.isfinite(h)]
    if h.size < 3:
        return math.nan
    if np.any(h <= 0):
        raise ValueError(f"entropies must be > 0 for a log change, got min {h.min()}")
    return float(np.std(np.diff(np.log(h))))


def _log_entropy(mean_entropy: Sequence[float] | np.ndarray, least: int) -> np.ndarray | None:
    """``log`` of the finite entries, or None with fewer than ``least`` of them."""
    h = np.asarray(mean_entropy, dtype=np.float64).reshape(-1)
    h = h[np.isfinite(h)]
    if h.size < least:
        return None
    if np.any(h <= 0):
        raise ValueError(f"entropies must be > 0 for a log change, got min {h.min()}")
    return np.log(h)


def entropy_trend(mean_entropy: Sequence[float] | np.ndarray) -> float:
    """Least-squares slope of ``log H_t`` against the update index ``t`` (per update).

    The steady part of the entropy's movement: ``-0.01`` is a decline of about 1% per update.
    A straight line in ``log H`` has exactly its slope here, and noise around a flat curve gives
    about 0. Unlike the mean of ``diff(log H)`` (which only sees the first and last value) every
    update counts. NaN entries are dropped; NaN with fewer than two values.
    """
    log_h = _log_entropy(mean_entropy, 2)
    if log_h is None:
        return math.nan
    t = np.arange(log_h.size, dtype=np.float64)
    t -= t.mean()
    return float((t * (log_h - log_h.mean())).sum() / (t * t).sum())


def entropy_steepest_fall(mean_entropy: Sequence[float] | np.ndarray) -> float:
    """The most negative one-update change of ``log H`` (0 when it never falls).

    ``-0.5`` means that one update took ``1 - exp(-0.5) = 39%`` of the entropy at once. NaN with
    fewer than two values.
    """
    log_h = _log_entropy(mean_entropy, 2)
    if log_h is None:
        return math.nan
    return float(min(np.diff(log_h).min(), 0.0))


def entropy_jitter(mean_entropy: Sequence[float] | np.ndarray) -> float:
    """Jitter of ``log H_t`` around its trend: ``std(second differences) / sqrt(6)``.

    Second differences ``log H_{t+1} - 2 log H_t + log H_{t-1}`` are 0 on any straight line, so a
    steady decline of any speed has no jitter; for a straight line plus independent noise of
    standard deviation ``s`` they have variance ``6 s^2``, so the value estimates ``s`` (the
    update-to-update noise in ``log H``, e.g. 0.02 = about 2%). NaN with fewer than four values.
    """
    log_h = _log_entropy(mean_entropy, 4)
    if log_h is None:
        return math.nan
    return float(np.std(np.diff(log_h, n=2), ddof=1) / math.sqrt(6.0))


def grad_norm_spikes(
    grad_norms: Sequence[float] | np.ndarray, k: float = 3.0, warmup: int = 5
) -> int:
    """Number of updates whose gradient norm exceeds ``k`` x the median of all earlier updates.

    The first ``warmup`` updates only feed the running median (a median of fewer values is too
    noisy to call anything a spike). NaN entries are skipped.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got k={k}")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1, got warmup={warmup}")
    seen: list[float] = []
    spikes = 0
    for g in grad_norms:
        if not math.isfinite(g):
            continue
        if len(seen) >= warmup and g > k * float(np.median(seen)):
            spikes += 1
        seen.append(float(g))
    return spikes


def unsampled_drift(old_probs: Tensor, new_probs: Tensor, sampled: Tensor) -> float:
    """Mean over states of ``0.5 * sum_{a not sampled} |p_new(a) - p_old(a)|``.

    Args:
        old_probs: ``(S, V)`` action probabilities of the policy that sampled the batch.
        new_probs: ``(S, V)`` the same after the update.
        sampled: ``(S, V)`` bool, True where the action was sampled in that state.
    """
    if old_probs.shape != new_probs.shape or old_probs.shape != sampled.shape:
        raise ValueError(
            f"old_probs, new_probs and sampled must have one shape (S, V), got "
            f"{tuple(old_probs.shape)}, {tuple(new_probs.shape)}, {tuple(sampled.shape)}"
        )
    diff = (new_probs.double() - old_probs.double()).abs()
    return float((0.5 * (diff * ~sampled.bool()).sum(-1)).mean())


def clipped_vs_kept_old_entropy(old_entropy: Tensor, keep: Tensor) -> tuple[float, float]:
    """Mean old entropy of the ERC-clipped and of the kept states (NaN for an empty set)."""
    if old_entropy.shape != keep.shape:
        raise ValueError(
            f"old_entropy and keep must have one shape, got {tuple(old_entropy.shape)} and "
            f"{tuple(keep.shape)}"
        )
    h = old_entropy.double().reshape(-1)
    k = keep.bool().reshape(-1)
    clipped = float(h[~k].mean()) if bool((~k).any()) else math.nan
    kept = float(h[k].mean()) if bool(k.any()) else math.nan
    return clipped, kept


def ratio_histogram(ratio: Tensor | np.ndarray) -> list[int]:
    """Counts of entropy ratios on :data:`RATIO_EDGES` (out-of-range values go to the end bins)."""
    r = np.asarray(ratio.detach().cpu() if isinstance(ratio, Tensor) else ratio, np.float64)
    r = r[np.isfinite(r)].reshape(-1)
    r = np.clip(r, RATIO_EDGES[0], RATIO_EDGES[-1])
    counts, _ = np.histogram(r, bins=RATIO_EDGES)
    return [int(c) for c in counts]


#: Names that moved out of this module: name -> its module now (looked up by name, so this core
#: module imports nothing from the SB3 adapter).
_MOVED = {"EntropyDynamicsCallback": "erc_gym.sb3"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(
            f"erc_gym.diagnostics.{name} is deprecated and will be removed in the next release; "
            f"import it from {_MOVED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'erc_gym.diagnostics' has no attribute {name!r}")
