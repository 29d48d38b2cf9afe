"""Off-policy stress maps: where on (optimiser steps per rollout x learning rate) does ERC help?

An experiment config may add a stress grid with the optional key ``axes``::

    "axes": {"steps_per_rollout": [2, 8, 16], "lr": [0.02, 0.1, 0.5]}

The grid (:func:`erc_gym.lab.grid.expand`) then repeats its algorithm x ERC band x seed grid on
every point of the product, with the settings each trainer kind derives from the point
(:func:`erc_gym.lab.kinds.axis_settings`), and names the variants ``<env>-<algo>[-erc..]-s<S>-
lr<lr>``. Each run's ``config.json`` records the point under ``"axes"``.

This module turns such a runs folder into tables:

* :func:`cell_table` -- per cell (env, algorithm, band, steps, lr): final-score IQM with a 95%
  bootstrap CI, entropy volatility, the share of unstable runs (:func:`instability`), gradient-norm
  spikes, clip fractions, old entropy of ERC-clipped / kept states;
* :func:`effect_table` -- ERC's effect in each cell against the same algorithm without ERC:
  IQM difference with a 95% bootstrap CI, probability of improvement with its CI, and the
  differences of volatility, spikes and instability; cells whose CI excludes 0 are marked;
* :func:`band_rule_table` -- the adaptive band against the fixed bands at the same point;
* :func:`claims_table` -- the paper's claims (``docs/method.md``) with this scale's measurement and
  a verdict (holds / does not hold / depends on an axis).

The figure is :func:`erc_gym.lab.plots.plot_stress_map`, the report section
:func:`erc_gym.lab.report.stress_markdown`; the statistics are :mod:`erc_gym.lab.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erc_gym.diagnostics import entropy_volatility, grad_norm_spikes
from erc_gym.lab.analysis import Run, load_runs
from erc_gym.lab.stats import (
    bootstrap_ci,
    diff_ci,
    finite,
    finite_mean,
    iqm,
    probability_of_improvement,
)

__all__ = [
    "CLAIMS",
    "COLLAPSE_FACTOR",
    "EXPLOSION_FACTOR",
    "SCORE_DROP_SHARE",
    "CellKey",
    "band_rule_table",
    "cell_table",
    "claims_table",
    "effect_table",
    "finished_stress_runs",
    "instability",
]

#: Entropy collapse: the final mean entropy is below this share of the first logged one.
COLLAPSE_FACTOR = 0.01
#: Entropy blow-up: a logged mean entropy exceeds this multiple of the first logged one.
EXPLOSION_FACTOR = 1.5
#: Score drop: the final score lost more than this share of the run's best gain over its start.
SCORE_DROP_SHARE = 0.5


# ---------------------------------------------------------------- per run and per cell


def instability(run: Run) -> dict[str, bool]:
    """Which failure a run shows, by the thresholds of this module.

    * ``collapse``: final mean entropy < :data:`COLLAPSE_FACTOR` x the first logged one;
    * ``explosion``: some mean entropy > :data:`EXPLOSION_FACTOR` x the first logged one;
    * ``score_drop``: the final score lost more than :data:`SCORE_DROP_SHARE` of the run's best
      gain over its first score (learnt, then fell back);
    * ``unstable``: any of the three.
    """
    _, h = run.series("entropy")
    _, s = run.series("score")
    collapse = bool(h.size >= 2 and h[-1] < COLLAPSE_FACTOR * h[0])
    explosion = bool(h.size >= 2 and h.max() > EXPLOSION_FACTOR * h[0])
    drop = False
    if s.size >= 2:
        gain = float(s.max() - s[0])
        drop = bool(gain > 0 and s.max() - s[-1] > SCORE_DROP_SHARE * gain)
    return {
        "collapse": collapse,
        "explosion": explosion,
        "score_drop": drop,
        "unstable": collapse or explosion or drop,
    }


def _run_mean(run: Run, name: str) -> float:
    return finite_mean(run.series(name)[1])


def _run_stats(run: Run, spike_k: float = 3.0) -> dict[str, float]:
    _, h = run.series("entropy")
    flags = instability(run)
    return {
        "score": run.final_score(),
        "volatility": entropy_volatility(h) if h.size >= 3 and np.all(h > 0) else math.nan,
        "spikes": float(grad_norm_spikes(run.series("grad_norm")[1], spike_k)),
        "unstable": float(flags["unstable"]),
        "collapse": float(flags["collapse"]),
        "explosion": float(flags["explosion"]),
        "score_drop": float(flags["score_drop"]),
        "erc_clip_fraction": _run_mean(run, "erc_clip_fraction"),
        "erc_clip_off_policy": _run_mean(run, "erc_clip_off_policy"),
        "clip_fraction": _run_mean(run, "clip_fraction"),
        "grad_norm": _run_mean(run, "grad_norm"),
        "entropy_old_clipped": _run_mean(run, "entropy_old_clipped"),
        "entropy_old_kept": _run_mean(run, "entropy_old_kept"),
        "erc_low_final": _run_last(run, "erc_low"),
        "erc_high_final": _run_last(run, "erc_high"),
    }


def _run_last(run: Run, name: str) -> float:
    ys = finite(run.series(name)[1])
    return float(ys[-1]) if ys.size else math.nan


@dataclass(frozen=True)
class CellKey:
    """One cell of a stress map."""

    env: str
    algorithm: str
    band: tuple[float, float] | None
    steps: int
    lr: float
    target: float | None = None
    """``erc_target_clip_fraction`` of an adaptive band (:mod:`erc_gym.adaptive_band`), else
    None (the fixed band)."""

    @property
    def fixed_band_label(self) -> str:
        """The band (the starting band of an adaptive one): ``off`` or ``(low, high)``."""
        return "off" if self.band is None else f"({self.band[0]:g}, {self.band[1]:g})"

    @property
    def band_label(self) -> str:
        if self.band is None or self.target is None:
            return self.fixed_band_label
        return f"adaptive {self.target:g} from {self.fixed_band_label}"


def _key(run: Run) -> CellKey:
    axes = run.config.get("axes") or {}
    band = run.config.get("erc")
    settings = run.config.get("settings") or {}
    steps = axes.get("steps_per_rollout", settings.get("minibatches", 0))
    lr = axes.get("lr", settings.get("lr", math.nan))
    target = {**settings, **(run.config.get("env") or {})}.get("erc_target_clip_fraction")
    return CellKey(
        env=run.env_label,
        algorithm=str(run.config.get("algorithm", "")),
        band=None if band is None else (float(band[0]), float(band[1])),
        steps=int(steps),
        lr=float(lr),
        target=None if target is None or band is None else float(target),
    )


def cell_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per cell: the key fields, ``n``, per-seed ``scores`` and the cell statistics.

    ``iqm``/``ci_low``/``ci_high``: final score; ``volatility``, ``spikes``, ``unstable`` (share
    of runs), ``erc_clip_fraction``, ``clip_fraction``, ``grad_norm``, ``entropy_old_clipped``,
    ``entropy_old_kept``: means over the cell's runs.
    """
    cells: dict[CellKey, list[dict[str, float]]] = {}
    kinds: dict[CellKey, str] = {}
    for run in runs:
        cells.setdefault(_key(run), []).append(_run_stats(run))
        kinds[_key(run)] = run.kind
    rows = []
    for key, stats in cells.items():
        scores = [s["score"] for s in stats]
        lo, hi = math.nan, math.nan
        if finite(scores).size:
            lo, hi = bootstrap_ci(scores)
        row: dict[str, Any] = {
            "key": key,
            "kind": kinds[key],
            "env": key.env,
            "algorithm": key.algorithm,
            "band": key.band_label,
            "fixed_band": key.fixed_band_label,
            "target": key.target,
            "steps": key.steps,
            "lr": key.lr,
            "n": len(stats),
            "scores": scores,
            "iqm": iqm(scores),
            "ci_low": lo,
            "ci_high": hi,
        }
        for name in stats[0]:
            if name != "score":
                row[name] = finite_mean([s[name] for s in stats])
        row["per_run"] = stats
        rows.append(row)
    rows.sort(
        key=lambda r: (r["env"], r["algorithm"], r["band"] != "off", r["band"], r["steps"], r["lr"])
    )
    return rows


def _compare(c: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Cell ``c`` against cell ``base`` at the same point: differences with 95% bootstrap CIs."""
    row: dict[str, Any] = {k: c[k] for k in ("env", "algorithm", "band", "steps", "lr")}
    row["n_erc"], row["n_off"] = c["n"], base["n"]
    # a bootstrap over one run per group has no spread: call nothing significant there
    can_test = min(c["n"], base["n"]) >= 2
    row["d_score"], row["d_score_lo"], row["d_score_hi"] = diff_ci(c["scores"], base["scores"])
    row["poi"], row["poi_lo"], row["poi_hi"] = probability_of_improvement(
        c["scores"], base["scores"]
    )
    significant = []
    if can_test and (row["d_score_lo"] > 0 or row["d_score_hi"] < 0):
        significant.append("score")
    if can_test and (row["poi_lo"] > 0.5 or row["poi_hi"] < 0.5):
        significant.append("poi")
    for name in ("volatility", "spikes", "unstable", "erc_clip_fraction"):
        d, lo, hi = diff_ci(
            [s[name] for s in c["per_run"]],
            [s[name] for s in base["per_run"]],
            statistic="mean",
        )
        row[f"d_{name}"], row[f"d_{name}_lo"], row[f"d_{name}_hi"] = d, lo, hi
        if can_test and (lo > 0 or hi < 0):
            significant.append(name)
    row["significant"] = significant
    return row


def effect_table(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """ERC's effect per cell: each ERC cell against the ERC-off cell of the same point.

    Keys: the cell's key fields, ``n_erc``, ``n_off``, ``d_score`` (IQM difference, ERC minus off)
    with ``d_score_lo``/``d_score_hi`` (95% bootstrap CI), ``poi`` with ``poi_lo``/``poi_hi``,
    ``d_volatility``/``d_spikes``/``d_unstable``/``d_erc_clip_fraction`` (mean differences) with
    CIs, and ``significant`` -- the names of the differences whose CI excludes 0 (PoI: excludes
    0.5); none where either group has fewer than two runs.
    """
    off = {(c["env"], c["algorithm"], c["steps"], c["lr"]): c for c in cells if c["band"] == "off"}
    out = []
    for c in cells:
        if c["band"] == "off":
            continue
        base = off.get((c["env"], c["algorithm"], c["steps"], c["lr"]))
        if base is not None:
            out.append(_compare(c, base))
    return out


def band_rule_table(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The adaptive band against fixed bands: each adaptive cell (``target`` set) against every
    fixed-band cell at the same point (env, algorithm, steps, lr), its starting band first.

    Keys as in :func:`effect_table` (differences are adaptive minus fixed; ``n_erc`` counts the
    adaptive runs, ``n_off`` the fixed ones), plus ``start`` (the adaptive band's starting band),
    ``fixed_band`` (the fixed band compared with), ``target``, the clip fractions
    ``erc_clip_adaptive`` / ``erc_clip_fixed`` (all steps) and ``erc_clip_off_policy_adaptive`` /
    ``erc_clip_off_policy_fixed`` (the off-policy steps, what the target is about), the mean
    final band of the adaptive runs, ``erc_low_final`` / ``erc_high_final``, and ``iqm_*`` /
    ``volatility_*`` of both.
    """
    fixed: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for c in cells:
        if c["target"] is None and c["band"] != "off":
            fixed.setdefault((c["env"], c["algorithm"], c["steps"], c["lr"]), []).append(c)
    out = []
    for c in cells:
        if c["target"] is None:
            continue
        bases = fixed.get((c["env"], c["algorithm"], c["steps"], c["lr"]), [])
        for base in sorted(bases, key=lambda b: b["fixed_band"] != c["fixed_band"]):
            out.append(_with_rule(c, base))
    return out


def _with_rule(c: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    row = _compare(c, base)
    row |= {
        "start": c["fixed_band"],
        "fixed_band": base["fixed_band"],
        "target": c["target"],
        "erc_clip_adaptive": c["erc_clip_fraction"],
        "erc_clip_fixed": base["erc_clip_fraction"],
        "erc_clip_off_policy_adaptive": c["erc_clip_off_policy"],
        "erc_clip_off_policy_fixed": base["erc_clip_off_policy"],
        "erc_low_final": c["erc_low_final"],
        "erc_high_final": c["erc_high_final"],
        "volatility_adaptive": c["volatility"],
        "volatility_fixed": base["volatility"],
        "iqm_adaptive": c["iqm"],
        "iqm_fixed": base["iqm"],
    }
    return row


# ---------------------------------------------------------------- the paper's claims

#: (claim id, the paper's statement (``docs/method.md``), what is measured here).
CLAIMS: tuple[tuple[str, str, str], ...] = (
    (
        "clip_share",
        "ERC clips about 20% of tokens, PPO-clip about 0.02%",
        "ERC clip fraction >= 10x PPO clip fraction (same runs)",
    ),
    (
        "low_entropy",
        "the clipped tokens are mostly low-entropy ones",
        "mean old entropy of ERC-clipped < of kept states",
    ),
    (
        "smoother_entropy",
        "entropy curves are smoother with ERC",
        "entropy volatility lower with ERC than without",
    ),
    (
        "fewer_spikes",
        "gradient norms are smoother, fewer spikes",
        "grad-norm spikes per run lower with ERC (cells with spikes)",
    ),
    (
        "no_collapse",
        "no entropy collapse / explosion with ERC",
        "share of unstable runs lower with ERC (cells where the baseline has some)",
    ),
    (
        "score",
        "accuracy gains over DAPO / GPPO",
        "final-score IQM higher with ERC, 95% CI of the difference excludes 0",
    ),
)


def _claim_outcome(claim: str, cell: dict[str, Any], effect: dict[str, Any]) -> bool | None:
    """True (holds), False (does not) or None (not measurable in this cell)."""
    if claim == "clip_share":
        erc, ppo = cell["erc_clip_fraction"], cell["clip_fraction"]
        return None if not (math.isfinite(erc) and math.isfinite(ppo)) else erc >= 10 * ppo
    if claim == "low_entropy":
        a, b = cell["entropy_old_clipped"], cell["entropy_old_kept"]
        return None if not (math.isfinite(a) and math.isfinite(b)) else a < b
    if claim == "smoother_entropy":
        d = effect["d_volatility"]
        return None if not math.isfinite(d) else d < 0
    if claim == "fewer_spikes":
        base = cell["spikes"] - effect["d_spikes"]
        if not math.isfinite(base) or (base == 0 and cell["spikes"] == 0):
            return None
        return bool(effect["d_spikes"] < 0)
    if claim == "no_collapse":
        base = cell["unstable"] - effect["d_unstable"]
        if not math.isfinite(base) or base == 0:
            return None
        return bool(effect["d_unstable"] < 0)
    if claim == "score":
        if "score" not in effect["significant"]:
            return None
        return bool(effect["d_score"] > 0)
    raise ValueError(f"unknown claim {claim!r}")


def _verdict(outcomes: list[tuple[CellKey, bool]], claim: str) -> str:
    if not outcomes:
        return "not measurable here" if claim != "score" else "no significant difference"
    held = [k for k, ok in outcomes if ok]
    if len(held) == len(outcomes):
        return f"holds ({len(held)}/{len(outcomes)} cells)"
    if not held:
        return f"does not hold (0/{len(outcomes)} cells)"
    for axis in ("steps", "lr", "algorithm", "band"):
        by_value: dict[Any, set[bool]] = {}
        for key, ok in outcomes:
            by_value.setdefault(getattr(key, axis), set()).add(ok)
        if len(by_value) > 1 and all(len(v) == 1 for v in by_value.values()):
            where = sorted(str(v) for v, s in by_value.items() if True in s)
            name = {"steps": "steps per rollout", "lr": "lr"}.get(axis, axis)
            return f"depends on {name}: holds at {', '.join(where)} ({len(held)}/{len(outcomes)})"
    return f"depends on the cell ({len(held)}/{len(outcomes)} cells)"


def claims_table(cells: Sequence[dict[str, Any]], env: str) -> list[dict[str, str]]:
    """The paper's claims for one environment: statement, measurement, per-cell verdict.

    Rows: ``claim``, ``paper``, ``measured`` (what is compared), ``values`` (the ranges seen),
    ``verdict``. Only ERC cells with an ERC-off partner count; a verdict "depends on <axis>" means
    the outcome is constant along every other axis value of that axis.
    """
    env_cells = [c for c in cells if c["env"] == env]
    effects = {(e["algorithm"], e["band"], e["steps"], e["lr"]): e for e in effect_table(env_cells)}
    pairs = [
        (c, effects[(c["algorithm"], c["band"], c["steps"], c["lr"])])
        for c in env_cells
        if (c["algorithm"], c["band"], c["steps"], c["lr"]) in effects
    ]
    rows = []
    for claim, paper, measured in CLAIMS:
        outcomes = []
        for cell, effect in pairs:
            ok = _claim_outcome(claim, cell, effect)
            if ok is not None:
                outcomes.append((cell["key"], ok))
        rows.append(
            {
                "claim": claim,
                "paper": paper,
                "measured": measured,
                "values": _claim_values(claim, [p[0] for p in pairs], [p[1] for p in pairs]),
                "verdict": _verdict(outcomes, claim),
            }
        )
    return rows


def _rng(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    x = finite(values)
    if x.size == 0:
        return "–"
    return fmt.format(x.min()) + " to " + fmt.format(x.max())


def _claim_values(claim: str, cells: list[dict[str, Any]], effects: list[dict[str, Any]]) -> str:
    if claim == "clip_share":
        return (
            f"ERC {_rng([c['erc_clip_fraction'] for c in cells], '{:.1%}')}, "
            f"PPO {_rng([c['clip_fraction'] for c in cells], '{:.2%}')}"
        )
    if claim == "low_entropy":
        return (
            f"clipped {_rng([c['entropy_old_clipped'] for c in cells])}, "
            f"kept {_rng([c['entropy_old_kept'] for c in cells])} nats"
        )
    if claim == "smoother_entropy":
        return f"Δ volatility {_rng([e['d_volatility'] for e in effects])}"
    if claim == "fewer_spikes":
        return f"Δ spikes/run {_rng([e['d_spikes'] for e in effects])}"
    if claim == "no_collapse":
        return f"Δ unstable share {_rng([e['d_unstable'] for e in effects])}"
    up = sum(1 for e in effects if "score" in e["significant"] and e["d_score"] > 0)
    down = sum(1 for e in effects if "score" in e["significant"] and e["d_score"] < 0)
    return (
        f"Δ IQM {_rng([e['d_score'] for e in effects])}; CI > 0 in {up}, < 0 in {down} "
        f"of {len(effects)} cells"
    )


def finished_stress_runs(experiment_dir: str | Path) -> list[Run]:
    """The finished runs of a stress experiment (unfinished runs would enter with a partial final
    score)."""
    return [r for r in load_runs(experiment_dir) if r.config.get("axes") and r.done]
