"""Entropy-dynamics diagnostics: the numbers that show what ERC does, for any policy-gradient run.

Pure functions over tensors or per-update series, shared by the experiment runner, the reports
and :class:`EntropyDynamicsCallback` (which logs them for any Stable-Baselines3 algorithm with a
discrete action space):

* :func:`entropy_volatility` -- std of the per-update change of ``log`` mean entropy;
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
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from erc_gym.sb3.callbacks import EntropyDynamicsCallback

__all__ = [
    "RATIO_EDGES",
    "EntropyDynamicsCallback",
    "clipped_vs_kept_old_entropy",
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
    steady decline gives a small value even when the decline is large; jumps up and down give a
    large one. NaN with fewer than three values; non-positive entropies are an error.
    """
    h = np.asarray(mean_entropy, dtype=np.float64)
    h = h[np.isfinite(h)]
    if h.size < 3:
        return math.nan
    if np.any(h <= 0):
        raise ValueError(f"entropies must be > 0 for a log change, got min {h.min()}")
    return float(np.std(np.diff(np.log(h))))


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


def __getattr__(name: str) -> Any:
    # The SB3 callback lives in erc_gym.sb3 so that the LLM path and the TRL / verl integrations,
    # which import this module, never import stable-baselines3.
    if name == "EntropyDynamicsCallback":
        from erc_gym.sb3.callbacks import EntropyDynamicsCallback

        return EntropyDynamicsCallback
    raise AttributeError(f"module 'erc_gym.diagnostics' has no attribute {name!r}")
