"""Reading a runs folder: per-run series, seed-aggregated curves, IQM and bootstrap intervals.

A runs folder is what :mod:`erc_gym.runner` writes: ``<experiment>/<variant>/<seed>/`` with
``config.json`` and ``metrics.jsonl``. The three kinds of run log under different key names (SB3's
``train/*``, the bandit's and the LLM trainer's own); :data:`SERIES_KEYS` maps them onto common
names so that plots and reports treat them alike.

Final scores are summarised as rliable does: the interquartile mean (IQM, the mean of the middle
50% of runs) with a 95% percentile-bootstrap confidence interval over runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erc_gym.diagnostics import entropy_volatility, grad_norm_spikes
from erc_gym.jsonl import read_jsonl

__all__ = [
    "SCORE_LABELS",
    "SERIES_KEYS",
    "STEP_LABELS",
    "Run",
    "bootstrap_ci",
    "iqm",
    "load_runs",
    "mean_curve",
    "summarize",
]

#: Common series name -> the key in ``metrics.jsonl`` for each kind of run.
SERIES_KEYS: dict[str, dict[str, str]] = {
    "sb3": {
        "step": "time/total_timesteps",
        "score": "eval/mean_reward",
        "entropy": "train/entropy",
        "erc_clip_fraction": "train/erc_clip_fraction",
        "clip_fraction": "train/clip_fraction",
        "grad_norm": "train/grad_norm",
        "tv_unsampled": "diagnostics/tv_unsampled",
        "ratio_hist": "diagnostics/entropy_ratio_hist",
        "entropy_old_clipped": "diagnostics/erc_clipped_entropy_old",
        "entropy_old_kept": "diagnostics/erc_kept_entropy_old",
    },
    "bandit": {
        "step": "step",
        "score": "expected_reward",
        "entropy": "entropy",
        "erc_clip_fraction": "erc_clip_fraction",
        "clip_fraction": "clip_fraction",
        "grad_norm": "grad_norm",
        "tv_unsampled": "tv_unsampled",
        "ratio_hist": "entropy_ratio_hist",
        "entropy_old_clipped": "erc_clipped_entropy_old_mean",
        "entropy_old_kept": "erc_kept_entropy_old_mean",
    },
    "llm": {
        "step": "step",
        "score": "eval_accuracy",
        "entropy": "entropy",
        "erc_clip_fraction": "erc_clip_fraction",
        "clip_fraction": "clip_fraction",
        "grad_norm": "grad_norm",
        "ratio_hist": "entropy_ratio_hist",
        "entropy_old_clipped": "erc_clipped_entropy_old_mean",
        "entropy_old_kept": "erc_kept_entropy_old_mean",
    },
}
#: y-axis label of the score per kind.
SCORE_LABELS = {
    "sb3": "evaluation return (deterministic)",
    "bandit": "expected reward (exact)",
    "llm": "held-out accuracy (greedy)",
}
#: x-axis label per kind.
STEP_LABELS = {"sb3": "environment steps", "bandit": "samples", "llm": "RL steps"}


@dataclass
class Run:
    """One run folder: its ``config.json`` and ``metrics.jsonl`` lines."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    done: bool

    @property
    def kind(self) -> str:
        return str(self.config.get("kind", "bandit"))

    @property
    def variant(self) -> str:
        return str(self.config.get("variant", self.path.parent.name))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", self.path.name))

    @property
    def env_label(self) -> str:
        """The environment part of the variant name (variants are ``<env>-<algorithm>...``)."""
        algo = self.config.get("algorithm")
        if algo and f"-{algo}" in self.variant:
            return self.variant[: self.variant.index(f"-{algo}")]
        return str(self.config.get("env_label", "env"))

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a common series name (rows where the value is finite)."""
        keys = SERIES_KEYS[self.kind]
        key, step_key = keys.get(name), keys["step"]
        xs, ys = [], []
        if key is None:
            return np.empty(0), np.empty(0)
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, int | float) and math.isfinite(value) and step_key in row:
                xs.append(float(row[step_key]))
                ys.append(float(value))
        return np.asarray(xs), np.asarray(ys)

    def histograms(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, counts (updates x bins))`` of the entropy-ratio histograms."""
        keys = SERIES_KEYS[self.kind]
        key, step_key = keys.get("ratio_hist"), keys["step"]
        xs, hs = [], []
        for row in self.rows:
            value = row.get(key) if key else None
            if isinstance(value, list) and value and step_key in row:
                xs.append(float(row[step_key]))
                hs.append(value)
        return np.asarray(xs), np.asarray(hs, dtype=np.float64)

    def final_score(self) -> float:
        """The last logged score (NaN when none)."""
        _, ys = self.series("score")
        return float(ys[-1]) if ys.size else math.nan


def load_runs(experiment_dir: str | Path) -> list[Run]:
    """Every ``<variant>/<seed>`` run folder below an experiment folder, sorted."""
    root = Path(experiment_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no experiment folder {root}")
    runs = []
    for cfg in sorted(root.glob("*/*/config.json")):
        folder = cfg.parent
        runs.append(
            Run(
                path=folder,
                config=json.loads(cfg.read_text()),
                rows=read_jsonl(folder / "metrics.jsonl"),
                done=(folder / "done").exists(),
            )
        )
    return runs


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: drop ``floor(n / 4)`` values at each end, average the rest."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan
    cut = x.size // 4
    return float(x[cut : x.size - cut].mean())


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[Sequence[float]], float] = iqm,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``statistic`` over ``values`` (runs)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, x.size, size=(reps, x.size))]
    stats = np.array([statistic(s) for s in samples])
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


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
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(curves), size=(reps, len(curves)))
    boot = ys[idx].mean(axis=1)
    return grid, mean, np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0)


def _mean(values: Sequence[float] | np.ndarray) -> float:
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def summarize(runs: Sequence[Run], spike_k: float = 3.0) -> list[dict[str, Any]]:
    """One row per variant (in first-seen order) with the final-score IQM, CI and diagnostics.

    Keys: ``variant``, ``env``, ``runs`` (finished / total), ``iqm``, ``ci_low``, ``ci_high``,
    ``mean``, ``per_seed`` (final scores), ``score_start`` (mean first logged score: the warm
    start / initial policy where it is evaluated before training), ``score_mean`` (mean of each
    run's logged scores -- an area under the learning curve -- averaged over runs),
    ``entropy_final``, ``entropy_volatility``,
    ``grad_norm_spikes`` (mean per run), ``erc_clip_fraction``, ``clip_fraction`` and
    ``tv_unsampled``, ``entropy_old_clipped`` and ``entropy_old_kept`` (mean old entropy of the
    states / tokens ERC clipped and kept; the SB3 callback's split uses its band even with ERC off)
    -- means over the run, then over runs.
    """
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    rows = []
    for variant, group in by_variant.items():
        finals = [r.final_score() for r in group]
        lo, hi = bootstrap_ci(finals)
        entropies = [r.series("entropy")[1] for r in group]
        rows.append(
            {
                "variant": variant,
                "env": group[0].env_label,
                "kind": group[0].kind,
                "runs": f"{sum(r.done for r in group)}/{len(group)}",
                "iqm": iqm(finals),
                "ci_low": lo,
                "ci_high": hi,
                "mean": _mean(finals),
                "per_seed": finals,
                "score_start": _mean(
                    [ys[0] if ys.size else math.nan for ys in (r.series("score")[1] for r in group)]
                ),
                "score_mean": _mean([_mean(r.series("score")[1]) for r in group]),
                "entropy_final": _mean([e[-1] if e.size else math.nan for e in entropies]),
                "entropy_volatility": _mean([entropy_volatility(e) for e in entropies]),
                "grad_norm_spikes": _mean(
                    [grad_norm_spikes(r.series("grad_norm")[1], spike_k) for r in group]
                ),
                "erc_clip_fraction": _mean(
                    [_mean(r.series("erc_clip_fraction")[1]) for r in group]
                ),
                "clip_fraction": _mean([_mean(r.series("clip_fraction")[1]) for r in group]),
                "tv_unsampled": _mean([_mean(r.series("tv_unsampled")[1]) for r in group]),
                "entropy_old_clipped": _mean(
                    [_mean(r.series("entropy_old_clipped")[1]) for r in group]
                ),
                "entropy_old_kept": _mean([_mean(r.series("entropy_old_kept")[1]) for r in group]),
            }
        )
    return rows
