"""Who gets clipped: a run's ``clipping.jsonl`` (one audit line per update) summarised.

The trainers write one line per update (:func:`erc_gym.diagnostics.clip_audit` and
:func:`erc_gym.diagnostics.state_audit`): counts of the tokens (states) outside the ERC band --
those ERC stopped, or with ERC off those it would have stopped at (0.95, 1.05) -- per old-entropy
decile, split by zero / non-zero advantage, per ``|A|`` decile, per response position and per
optimiser step of the rollout; a small random sample of tokens; and how far the update moved a
sample of states (entropy ratio, ``KL(old || new)``, a changed arg-max). This module adds the
lines of a run (or of several runs) into a :class:`ClipProfile`, and computes the conditional
measurement that replaces "the mean old entropy of clipped vs kept tokens": among tokens with a
non-zero advantage (a token whose advantage is 0 has no gradient to stop, and GRPO's
zero-advantage groups are the near-deterministic, low-entropy contexts), the clip probability of
the lower half of the old-entropy deciles minus that of the upper half
(:func:`low_entropy_excess`).

The figure is :func:`erc_gym.lab.plots.plot_who_gets_clipped`, the report section
:func:`erc_gym.lab.report.clipping_markdown`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from erc_gym.diagnostics import CLIPPING_FILE
from erc_gym.jsonl import read_jsonl
from erc_gym.lab.analysis import Run

__all__ = [
    "ClipProfile",
    "argmax_swap_share",
    "low_entropy_excess",
    "merge",
    "profile",
    "run_profile",
]

_BIN_KEYS = {
    "h_old_bins": ("n", "outside", "n_adv", "outside_adv", "h_sum"),
    "h_old_adv_bins": ("n", "outside", "h_sum"),
    "abs_adv_bins": ("n", "outside", "abs_sum"),
    "position_bins": ("n", "outside"),
}
_SAMPLE_KEYS = ("h_old", "rho", "adv", "outside", "position")
_STATE_KEYS = ("h_old", "rho", "kl", "argmax_changed")
_STATE_COUNTS = ("states", "in_band", "argmax_changed", "argmax_changed_in_band")


@dataclass
class ClipProfile:
    """The audit lines of one or more runs, added up.

    Attributes:
        updates: audit lines read.
        erc: whether ERC acted in them (else "outside" is the reference band's would-be clip).
        band: the band of the last line (an adaptive band moves).
        bins: ``h_old_bins`` / ``abs_adv_bins`` / ``position_bins`` -> key -> summed counts
            (position bins only for language-model runs).
        by_step: ``n`` and ``outside`` summed per optimiser step of the rollout (step 0 is the
            on-policy one).
        sample: the random token samples, concatenated (``h_old``, ``rho``, ``adv``,
            ``outside``, and ``position`` for language-model runs).
        states: the state counts summed (``states``, ``in_band``, ``argmax_changed``,
            ``argmax_changed_in_band``).
        state_sample: the random state samples, concatenated (``h_old``, ``rho``, ``kl``,
            ``argmax_changed``).
    """

    updates: int = 0
    erc: bool = False
    band: tuple[float, float] = (0.95, 1.05)
    bins: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    by_step: dict[str, np.ndarray] = field(default_factory=dict)
    sample: dict[str, np.ndarray] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    state_sample: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def has_tokens(self) -> bool:
        """Whether any line had the token part (ERC's entropies were computed)."""
        return "h_old_bins" in self.bins

    def rate(self, group: str, outside: str = "outside", n: str = "n") -> np.ndarray:
        """``outside / n`` per bin of ``group`` (NaN for an empty bin)."""
        b = self.bins.get(group)
        if b is None:
            return np.empty(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b[n] > 0, b[outside] / np.maximum(b[n], 1), np.nan)

    def bin_means(self, group: str) -> np.ndarray:
        """Mean old entropy (``h_old_bins``) or mean ``|A|`` (``abs_adv_bins``) per bin."""
        b = self.bins.get(group)
        if b is None:
            return np.empty(0)
        total = b["h_sum"] if group == "h_old_bins" else b["abs_sum"]
        count = b["n"]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def step_outside(self) -> np.ndarray:
        """Share of the tokens outside the band at each optimiser step of the rollout."""
        n = self.by_step.get("n")
        if n is None:
            return np.empty(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, self.by_step["outside"] / np.maximum(n, 1), np.nan)


def _add(total: np.ndarray | None, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``total + values``, the shorter one padded with zeros (runs differ in steps per rollout)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"expected a list of counts, got an array of shape {v.shape}")
    if total is None:
        return v
    if total.size < v.size:
        total = np.pad(total, (0, v.size - total.size))
    elif v.size < total.size:
        v = np.pad(v, (0, total.size - v.size))
    return total + v


def profile(lines: Sequence[dict[str, Any]]) -> ClipProfile | None:
    """Add up audit lines (of one run or several); None when there are none."""
    if not lines:
        return None
    whole = ClipProfile()
    for line in lines:
        try:  # a line of the run's own, added only when it reads and fits the others
            one = _line_profile(line)
            band = one.band if "band" in line else whole.band
            whole = merge([whole, one])
            whole.band = band
        except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError):
            continue  # a damaged line: left out (the metrics' notes name damaged runs)
    return whole


def _line_profile(line: dict[str, Any]) -> ClipProfile:
    """The profile of one audit line (raises on a line whose values have the wrong type)."""
    p = ClipProfile()
    samples: dict[str, list[float]] = {k: [] for k in _SAMPLE_KEYS}
    state_samples: dict[str, list[float]] = {k: [] for k in _STATE_KEYS}
    p.updates += 1
    if "band" in line:
        p.erc = p.erc or bool(line.get("erc"))
        p.band = (float(line["band"][0]), float(line["band"][1]))
    for group, keys in _BIN_KEYS.items():
        if isinstance(line.get(group), dict):
            into = p.bins.setdefault(group, {})
            for key in keys:
                into[key] = _add(into.get(key), line[group].get(key, []))
    if isinstance(line.get("by_step"), dict):
        for key in ("n", "outside"):
            p.by_step[key] = _add(p.by_step.get(key), line["by_step"][key])
    sample = line.get("sample")
    if isinstance(sample, dict):
        size = len(sample.get("h_old", []))
        for key in _SAMPLE_KEYS:
            samples[key] += list(sample.get(key, [math.nan] * size))
    for key in _STATE_COUNTS:
        if isinstance(line.get(key), int | float):
            p.states[key] = p.states.get(key, 0) + int(line[key])
    states = line.get("state_sample")
    if isinstance(states, dict):
        for key in _STATE_KEYS:
            state_samples[key] += list(states.get(key, []))
    p.sample = {k: np.asarray(v, dtype=np.float64) for k, v in samples.items() if v}
    p.state_sample = {k: np.asarray(v, dtype=np.float64) for k, v in state_samples.items() if v}
    return p


def merge(profiles: Sequence[ClipProfile]) -> ClipProfile:
    """Several runs' profiles added up (a variant over its seeds)."""
    out = ClipProfile()
    for p in profiles:
        out.updates += p.updates
        out.erc = out.erc or p.erc
        out.band = p.band
        for group, values in p.bins.items():
            into = out.bins.setdefault(group, {})
            for key, v in values.items():
                into[key] = _add(into.get(key), v)
        for key, v in p.by_step.items():
            out.by_step[key] = _add(out.by_step.get(key), v)
        for key, v in p.sample.items():
            out.sample[key] = np.concatenate([out.sample.get(key, np.empty(0)), v])
        for key, n in p.states.items():
            out.states[key] = out.states.get(key, 0) + n
        for key, v in p.state_sample.items():
            out.state_sample[key] = np.concatenate([out.state_sample.get(key, np.empty(0)), v])
    return out


def run_profile(run: Run) -> ClipProfile | None:
    """The profile of one run folder's ``clipping.jsonl`` (None: no such file, e.g. a run from
    before the trainers wrote it)."""
    return profile(read_jsonl(run.path / CLIPPING_FILE))


def low_entropy_excess(p: ClipProfile | None) -> float:
    """Among tokens with ``A != 0`` on off-policy steps: the clip probability of the lower half
    of their old-entropy deciles minus that of the upper half.

    Positive: ERC clips low-entropy tokens more often (the paper's "mostly low-entropy"), among
    tokens it has a gradient to stop. NaN without the token part or without such a token outside
    the band.
    """
    if p is None or "h_old_adv_bins" not in p.bins:
        return math.nan
    b = p.bins["h_old_adv_bins"]
    half = b["n"].size // 2
    n_low, n_high = b["n"][:half].sum(), b["n"][half:].sum()
    if n_low == 0 or n_high == 0 or b["outside"].sum() == 0:
        return math.nan
    return float(b["outside"][:half].sum() / n_low - b["outside"][half:].sum() / n_high)


def argmax_swap_share(p: ClipProfile | None) -> float:
    """Share of the audited states whose arg-max changed in an update while their entropy ratio
    stayed inside the band (NaN without state counts)."""
    if p is None or not p.states.get("states"):
        return math.nan
    return p.states.get("argmax_changed_in_band", 0) / p.states["states"]
