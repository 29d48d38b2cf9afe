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
  one row per update, for heat maps over training;
* :func:`clip_audit` and :func:`state_audit` -- who gets clipped, per update: ERC's clip counts
  per old-entropy decile (split by zero / non-zero advantage), per ``|A|`` decile and per response
  position, per optimiser step of the rollout, a small random sample of tokens, and how the
  states moved (entropy ratio, ``KL(old || new)``, a changed arg-max). The trainers write one
  line of both per update to :data:`CLIPPING_FILE` beside ``metrics.jsonl``.

All entropies are per state (per token for a language model) and in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from erc_gym.entropy import entropy_from_logits, kl_from_logits
from erc_gym.losses import LossStats, entropy_ratio

__all__ = [
    "AUDIT_BINS",
    "AUDIT_POSITIONS",
    "AUDIT_SAMPLE",
    "CLIPPING_FILE",
    "RATIO_EDGES",
    "REFERENCE_BAND",
    "audit_seed",
    "clip_audit",
    "clipped_vs_kept_old_entropy",
    "entropy_jitter",
    "entropy_steepest_fall",
    "entropy_trend",
    "entropy_volatility",
    "grad_norm_spikes",
    "ratio_histogram",
    "state_audit",
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


# ---------------------------------------------------------------- who gets clipped

#: The run-folder file of :func:`clip_audit` / :func:`state_audit` lines, one per update (kept out
#: of ``metrics.jsonl`` so that stays small), under the same counter key as ``metrics.jsonl``.
CLIPPING_FILE = "clipping.jsonl"
#: Bins of the old-entropy and ``|A|`` splits of :func:`clip_audit` (deciles of the update).
AUDIT_BINS = 10
#: Response positions counted one by one by :func:`clip_audit` (later ones share the last bin).
AUDIT_POSITIONS = 16
#: Tokens (and states) in the random sample of one update's audit line.
AUDIT_SAMPLE = 16
#: The band an ERC-off run is measured against: what ERC(0.95, 1.05) would have clipped.
REFERENCE_BAND = (0.95, 1.05)


def audit_seed(seed: int, update: int) -> int:
    """The seed of an update's audit sample: fixed by the run's seed and the update's number, so
    a resumed run draws the same sample and no trainer's random stream is touched."""
    return (int(seed) * 1_000_003 + int(update)) % 2**63


def _round(values: Tensor) -> list[float]:
    """Floats with 4 significant digits (the audit file stays small; NaN stays NaN)."""
    return [float(f"{v:.4g}") for v in values.detach().double().cpu().tolist()]


def _deciles(x: Tensor, bins: int) -> Tensor:
    """Bin index ``0..bins-1`` of each entry of ``x`` by the quantiles of ``x`` itself (ties go to
    the higher bin, so tied values share one bin)."""
    if x.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    qs = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=x.device)[1:-1]
    edges = torch.quantile(x.double(), qs)
    return torch.searchsorted(edges, x.double().contiguous(), right=True)


def _counts(index: Tensor, bins: int, weights: dict[str, Tensor]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for name, w in weights.items():
        c = torch.bincount(index, weights=w.double(), minlength=bins)[:bins]
        out[name] = _round(c) if w.dtype.is_floating_point else [int(v) for v in c.tolist()]
    return out


def clip_audit(
    stats: Sequence[LossStats],
    *,
    positions: bool = False,
    sample: int = AUDIT_SAMPLE,
    seed: int = 0,
    bins: int = AUDIT_BINS,
) -> dict[str, Any] | None:
    """Who ERC clipped in one update (the ``LossStats`` of its mini-batch steps, in order).

    A token is *outside* when ERC stopped its gradient (ERC on: the loss's own mask) or, with ERC
    off, when its entropy ratio is outside :data:`REFERENCE_BAND` (what ERC would have stopped).
    The first step of a rollout is on-policy (every ratio is 1, ERC cannot act), so the splits
    count the later, off-policy steps; ``by_step`` counts every step.

    Args:
        stats: ``LossOutput.stats`` of the update's ``policy_loss`` calls, first step first; each
            with entropies (None is returned otherwise: nothing to measure).
        positions: the tensors are ``(B, T)`` response tokens: also count per response position.
        sample: tokens in the random sample.
        seed: seed of the sample (:func:`audit_seed`).
        bins: bins of the old-entropy and ``|A|`` splits.

    Returns:
        ``erc`` (whether ERC acted), ``band``, ``tokens`` / ``outside`` (off-policy valid tokens
        and those outside), ``by_step`` (``n``, ``outside`` per optimiser step), ``h_old_bins``
        (per old-entropy decile of the off-policy tokens: ``n``, ``outside``, ``n_adv`` and
        ``outside_adv`` among tokens with ``A != 0``, ``h_sum`` -- the sum of their old
        entropies), ``h_old_adv_bins`` (the same per old-entropy decile of the tokens with
        ``A != 0`` alone: ``n``, ``outside``, ``h_sum``), ``abs_adv_bins`` (per ``|A|`` decile
        of the tokens with ``A != 0``: ``n``,
        ``outside``, ``abs_sum``), ``position_bins`` (with ``positions``: per response position,
        tokens with ``A != 0``: ``n``, ``outside``; the last bin collects the later positions)
        and ``sample`` (``h_old``, ``rho``, ``adv``, ``outside`` and ``position`` of up to
        ``sample`` random off-policy tokens).
    """
    if not stats or any(s.entropy is None or s.old_entropy is None for s in stats):
        return None
    erc = stats[0].config.erc
    low, high = (erc.low, erc.high) if erc is not None else REFERENCE_BAND
    step_n, step_out = [], []
    parts: dict[str, list[Tensor]] = {k: [] for k in ("h_old", "rho", "adv", "outside", "pos")}
    with torch.no_grad():
        for k, s in enumerate(stats):
            assert s.entropy is not None and s.old_entropy is not None
            rho = s.rho if s.rho is not None else entropy_ratio(s.entropy, s.old_entropy)
            valid = (
                s.valid.bool() if s.valid is not None else torch.ones_like(rho, dtype=torch.bool)
            )
            if s.keep is not None:
                outside = valid & ~s.keep.bool()
            else:
                outside = valid & ~((rho > low) & (rho < high))
            step_n.append(valid.sum())
            step_out.append(outside.sum())
            if k == 0:
                continue
            adv = s.advantages.detach()
            if adv.shape != rho.shape:
                adv = adv.reshape(*adv.shape, *([1] * (rho.dim() - adv.dim()))).expand_as(rho)
            parts["h_old"].append(s.old_entropy.detach().float()[valid])
            parts["rho"].append(rho.float()[valid])
            parts["adv"].append(adv.float()[valid])
            parts["outside"].append(outside[valid])
            if positions and rho.dim() == 2:
                column = torch.arange(rho.shape[1], device=rho.device).expand_as(rho)
                parts["pos"].append(column[valid])
        counts = torch.stack([torch.stack(step_n), torch.stack(step_out)]).cpu().tolist()
        out: dict[str, Any] = {
            "erc": erc is not None,
            "band": [low, high],
            "by_step": {"n": [int(v) for v in counts[0]], "outside": [int(v) for v in counts[1]]},
        }
        empty = torch.zeros(0)
        h_old = torch.cat(parts["h_old"]) if parts["h_old"] else empty
        rho = torch.cat(parts["rho"]) if parts["rho"] else empty
        adv = torch.cat(parts["adv"]) if parts["adv"] else empty
        outside = torch.cat(parts["outside"]) if parts["outside"] else empty.bool()
        nonzero = adv != 0
        out["tokens"] = int(h_old.numel())
        out["outside"] = int(outside.sum())
        ones = torch.ones_like(h_old)
        out["h_old_bins"] = _counts(
            _deciles(h_old, bins),
            bins,
            {
                "n": ones.long(),
                "outside": outside.long(),
                "n_adv": nonzero.long(),
                "outside_adv": (outside & nonzero).long(),
                "h_sum": h_old,
            },
        )
        h_adv = h_old[nonzero]
        out["h_old_adv_bins"] = _counts(
            _deciles(h_adv, bins),
            bins,
            {
                "n": torch.ones_like(h_adv).long(),
                "outside": outside[nonzero].long(),
                "h_sum": h_adv,
            },
        )
        a = adv[nonzero].abs()
        out["abs_adv_bins"] = _counts(
            _deciles(a, bins),
            bins,
            {"n": torch.ones_like(a).long(), "outside": outside[nonzero].long(), "abs_sum": a},
        )
        pos = torch.cat(parts["pos"]) if parts["pos"] else None
        if pos is not None:
            p = pos[nonzero].clamp(max=AUDIT_POSITIONS - 1)
            out["position_bins"] = _counts(
                p,
                AUDIT_POSITIONS,
                {"n": torch.ones_like(p), "outside": outside[nonzero].long()},
            )
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(h_old.numel(), generator=gen)[:sample].to(h_old.device)
        out["sample"] = {
            "h_old": _round(h_old[pick]),
            "rho": _round(rho[pick]),
            "adv": _round(adv[pick]),
            "outside": [bool(v) for v in outside[pick].tolist()],
        }
        if pos is not None:
            out["sample"]["position"] = [int(v) for v in pos[pick].tolist()]
    return out


def state_audit(
    old_logits: Tensor,
    new_logits: Tensor,
    band: tuple[float, float] | None = None,
    *,
    temperature: float = 1.0,
    sample: int = AUDIT_SAMPLE,
    seed: int = 0,
) -> dict[str, Any]:
    """How far an update moved each state: entropy ratio, ``KL(old || new)``, arg-max change.

    The entropy ratio is blind to a swap of the top action at equal entropy; the counts say how
    often that happened: ``argmax_changed_in_band`` states changed their most likely action while
    their ratio stayed inside ``band`` (where ERC keeps the gradient).

    Args:
        old_logits: ``(N, V)`` logits of the states before the update (the old policy).
        new_logits: ``(N, V)`` the same states after it.
        band: the ERC band (default :data:`REFERENCE_BAND`).
        temperature: sampling temperature of the policy.
        sample: states in the random sample.
        seed: seed of the sample (:func:`audit_seed`).

    Returns:
        ``states``, ``in_band``, ``argmax_changed``, ``argmax_changed_in_band`` (counts) and
        ``state_sample`` (``h_old``, ``rho``, ``kl``, ``argmax_changed`` of up to ``sample``
        random states).
    """
    if old_logits.shape != new_logits.shape:
        raise ValueError(
            f"old_logits and new_logits must have one shape (N, V), got "
            f"{tuple(old_logits.shape)} and {tuple(new_logits.shape)}"
        )
    low, high = band if band is not None else REFERENCE_BAND
    with torch.no_grad():
        old = old_logits.detach().reshape(-1, old_logits.shape[-1]).float()
        new = new_logits.detach().reshape(-1, new_logits.shape[-1]).float()
        h_old = entropy_from_logits(old, temperature=temperature)
        rho = entropy_ratio(entropy_from_logits(new, temperature=temperature), h_old)
        kl = kl_from_logits(old, new, temperature=temperature)
        changed = old.argmax(-1) != new.argmax(-1)
        in_band = (rho > low) & (rho < high)
        n = torch.stack([in_band.sum(), changed.sum(), (changed & in_band).sum()]).tolist()
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(h_old.numel(), generator=gen)[:sample].to(h_old.device)
        return {
            "states": int(h_old.numel()),
            "in_band": int(n[0]),
            "argmax_changed": int(n[1]),
            "argmax_changed_in_band": int(n[2]),
            "state_sample": {
                "h_old": _round(h_old[pick]),
                "rho": _round(rho[pick]),
                "kl": _round(kl[pick]),
                "argmax_changed": [bool(v) for v in changed[pick].tolist()],
            },
        }


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
