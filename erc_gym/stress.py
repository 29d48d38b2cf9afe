"""Off-policy stress maps: where on (optimiser steps per rollout x learning rate) does ERC help?

An experiment config may add a stress grid with the optional key ``axes``::

    "axes": {"steps_per_rollout": [2, 8, 16], "lr": [0.02, 0.1, 0.5]}

The runner (:func:`erc_gym.runner.expand`) then repeats its algorithm x ERC band x seed grid on
every point of the product, with the settings of :func:`axis_settings` (how far the policy moves
per rollout, in each trainer's own terms), and names the variants ``<env>-<algo>[-erc..]-s<S>-
lr<lr>``. Each run's ``config.json`` records the point under ``"axes"``.

This module turns such a runs folder into

* :func:`cell_table` -- per cell (env, algorithm, band, steps, lr): final-score IQM with a 95%
  bootstrap CI, entropy volatility, the share of unstable runs (:func:`instability`), gradient-norm
  spikes, clip fractions, old entropy of ERC-clipped / kept states;
* :func:`effect_table` -- ERC's effect in each cell against the same algorithm without ERC:
  IQM difference with a 95% bootstrap CI, probability of improvement with its CI, and the
  differences of volatility, spikes and instability; cells whose CI excludes 0 are marked;
* :func:`claims_table` -- the paper's claims (ERC_SPEC section 4) with this scale's measurement and
  a verdict (holds / does not hold / depends on an axis);
* :func:`plot_stress_map` -- one heat-map figure per environment; :func:`stress_markdown` -- the
  report section (called by :func:`erc_gym.report.write_report`).

Statistics follow rliable (Agarwal et al., NeurIPS 2021): interquartile mean, percentile bootstrap
over seeds (resampling each group independently, i.e. stratified by group), probability of
improvement ``P(X > Y) + P(X = Y) / 2`` (Mann-Whitney). They are written with numpy here because
the ``rliable`` package pulls ``arch`` (with ``statsmodels``), ``scipy``, ``pandas`` and ``seaborn``
into a library that needs none of them, for three short formulas.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erc_gym.analysis import SCORE_LABELS, Run, iqm, load_runs
from erc_gym.diagnostics import entropy_volatility, grad_norm_spikes

__all__ = [
    "AXES",
    "COLLAPSE_FACTOR",
    "EXPLOSION_FACTOR",
    "SCORE_DROP_SHARE",
    "axis_label",
    "axis_points",
    "axis_settings",
    "band_rule_markdown",
    "band_rule_table",
    "cell_table",
    "check_axes",
    "claims_table",
    "diff_ci",
    "effect_table",
    "instability",
    "plot_stress_map",
    "probability_of_improvement",
    "stress_markdown",
]

#: The stress axes an experiment config may list under ``"axes"``.
AXES = ("steps_per_rollout", "lr")
#: Entropy collapse: the final mean entropy is below this share of the first logged one.
COLLAPSE_FACTOR = 0.01
#: Entropy blow-up: a logged mean entropy exceeds this multiple of the first logged one.
EXPLOSION_FACTOR = 1.5
#: Score drop: the final score lost more than this share of the run's best gain over its start.
SCORE_DROP_SHARE = 0.5


def check_axes(axes: Any) -> None:
    """Raise ``ValueError`` unless ``axes`` maps names of :data:`AXES` to lists of values.

    ``steps_per_rollout`` takes integers >= 1, ``lr`` numbers > 0.
    """
    if not isinstance(axes, dict) or not axes:
        raise ValueError(f"axes must be a non-empty mapping of {AXES} to lists, got {axes!r}")
    for name, values in axes.items():
        if name not in AXES:
            raise ValueError(f"unknown stress axis {name!r}; choose from {AXES}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"axes.{name} must be a non-empty list, got {values!r}")
        for v in values:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and v > 0
            if name == "steps_per_rollout":
                ok = ok and float(v).is_integer()
            if not ok:
                what = "integers >= 1" if name == "steps_per_rollout" else "numbers > 0"
                raise ValueError(f"axes.{name} must hold {what}, got {v!r}")


def axis_points(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every point of the product of the axes (``steps_per_rollout`` varies slowest)."""
    names = [a for a in AXES if a in axes]
    return [
        dict(zip(names, combo, strict=True))
        for combo in itertools.product(*(axes[n] for n in names))
    ]


def axis_label(point: dict[str, Any]) -> str:
    """Variant suffix of a point, e.g. ``-s8-lr0.05``."""
    out = ""
    if "steps_per_rollout" in point:
        out += f"-s{int(point['steps_per_rollout'])}"
    if "lr" in point:
        out += f"-lr{float(point['lr']):g}"
    return out


def axis_settings(
    kind: str, env: dict[str, Any], settings: dict[str, Any], point: dict[str, Any]
) -> dict[str, Any]:
    """Trainer settings that put a run at a stress point, merged over ``settings``.

    ``steps_per_rollout`` S (optimiser steps on one sampled batch = mini-batches x epochs):

    * ``bandit``: ``minibatches = S``;
    * ``llm``: with P = ``prompts_per_step`` (default 16), ``mini_batch_prompts = P / S`` and one
      epoch for S <= P, else one prompt per mini-batch and ``epochs = S / P`` (S must divide P or
      be a multiple of it);
    * ``sb3``: the whole rollout (``n_envs x n_steps``) is one mini-batch and ``n_epochs = S``.

    ``lr`` is the learning rate (``learning_rate`` for SB3, replacing a preset's schedule by a
    constant).
    """
    out = dict(settings)
    steps = point.get("steps_per_rollout")
    lr = point.get("lr")
    if kind == "bandit":
        if steps is not None:
            out["minibatches"] = int(steps)
        if lr is not None:
            out["lr"] = float(lr)
    elif kind == "llm":
        if steps is not None:
            s = int(steps)
            prompts = int({**out, **env}.get("prompts_per_step", 16))
            if s <= prompts and prompts % s == 0:
                out["mini_batch_prompts"], out["epochs"] = prompts // s, 1
            elif s > prompts and s % prompts == 0:
                out["mini_batch_prompts"], out["epochs"] = 1, s // prompts
            else:
                raise ValueError(
                    f"axes.steps_per_rollout={s} must divide prompts_per_step={prompts} "
                    "or be a multiple of it"
                )
        if lr is not None:
            out["lr"] = float(lr)
    elif kind == "sb3":
        from erc_gym.sb3.presets import PRESETS

        if steps is not None:
            preset = PRESETS[env["id"]]
            n_steps = int({**preset, **out, **env}.get("n_steps", 2048))
            out["batch_size"] = n_steps * int(preset["n_envs"])
            out["n_epochs"] = int(steps)
        if lr is not None:
            out["learning_rate"] = float(lr)
    else:
        raise ValueError(f"kind must be 'bandit', 'llm' or 'sb3', got {kind!r}")
    return out


# ---------------------------------------------------------------- statistics


def _iqm_rows(samples: np.ndarray) -> np.ndarray:
    """IQM of each row of a (reps, n) array (the same cut as :func:`erc_gym.analysis.iqm`)."""
    x = np.sort(samples, axis=1)
    cut = x.shape[1] // 4
    return x[:, cut : x.shape[1] - cut].mean(axis=1)


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]


def _resampled(
    x: Sequence[float], y: Sequence[float], reps: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The finite values of ``x`` and ``y`` and ``reps`` bootstrap resamples of each (drawn
    separately, so the groups may differ in size); None when a group has no finite value."""
    a, b = _finite(x), _finite(y)
    if a.size == 0 or b.size == 0:
        return None
    rng = np.random.default_rng(seed)
    sa = a[rng.integers(0, a.size, size=(reps, a.size))]
    sb = b[rng.integers(0, b.size, size=(reps, b.size))]
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
        point = iqm(a.tolist()) - iqm(b.tolist())
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
    ys = _finite(run.series(name)[1])
    return float(ys.mean()) if ys.size else math.nan


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
    ys = _finite(run.series(name)[1])
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


def _mean(values: Sequence[float]) -> float:
    x = _finite(values)
    return float(x.mean()) if x.size else math.nan


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
        if _finite(scores).size:
            from erc_gym.analysis import bootstrap_ci

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
                row[name] = _mean([s[name] for s in stats])
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

#: (claim id, the paper's statement (ERC_SPEC section 4), what is measured here).
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
    x = _finite(values)
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


# ---------------------------------------------------------------- figure


def _cell_text(value: float) -> str:
    """A heat-map cell's number: whole numbers from 10 up, two significant digits below."""
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"


#: The stress map's rows per algorithm: (row name, metric in the ERC-off column, metric in each
#: band's column, colour map of the band columns). The ERC-off column shows the absolute value;
#: the band columns show ERC's effect, coloured so that blue is always "better with ERC".
_MAP_ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("score", "iqm", "d_score", "RdBu"),  # higher score = better = blue
    ("volatility", "volatility", "d_volatility", "RdBu_r"),  # lower volatility = blue
    ("unstable", "unstable", "unstable", "Reds"),
)


def plot_stress_map(cells: Sequence[dict[str, Any]], env: str, path: str | Path) -> list[Path]:
    """One heat-map figure of an environment's stress map; returns the PNG and SVG paths.

    Columns: ERC off, then one per ERC band (fixed or adaptive). For each algorithm three rows of
    panels, each over x = optimiser steps per rollout and y = learning rate:

    * final score: the IQM without ERC, and ERC's effect on it (IQM difference, ERC minus off);
    * entropy volatility: the value without ERC, and ERC's effect (mean difference);
    * the share of unstable runs (:func:`instability`) in each column.

    In the effect panels blue means better with ERC (higher score, smoother entropy) and red
    worse, on one colour scale per metric; a framed cell with a ``*``: the 95% bootstrap CI of the
    difference excludes 0.
    """
    from erc_gym.plots import _pyplot, _save

    plt = _pyplot()
    env_cells = [c for c in cells if c["env"] == env]
    effects = effect_table(env_cells)
    algos = list(dict.fromkeys(c["algorithm"] for c in env_cells))
    bands = list(dict.fromkeys(c["band"] for c in env_cells if c["band"] != "off"))
    columns = ["off", *bands]
    steps = sorted({c["steps"] for c in env_cells})
    lrs = sorted({c["lr"] for c in env_cells})
    ns = sorted({c["n"] for c in env_cells})
    # one colour scale per effect metric across algorithms and bands, so colours compare
    lims = {}
    for metric in ("d_score", "d_volatility"):
        values = np.abs(_finite([e[metric] for e in effects]))
        lims[metric] = float(values.max()) if values.size and values.any() else 1.0
    kind = str(env_cells[0]["kind"]) if env_cells else ""
    score_unit = SCORE_LABELS.get(kind, "score")
    titles = {
        ("score", True): "final score IQM, ERC off\n(" + score_unit + ")",
        ("score", False): "Δ final score IQM, ERC {b} − off\n(blue = higher with ERC)",
        ("volatility", True): "entropy volatility, ERC off",
        ("volatility", False): "Δ entropy volatility, ERC {b} − off\n(blue = smoother with ERC)",
        ("unstable", True): "share of unstable runs, ERC off",
        ("unstable", False): "share of unstable runs, ERC {b}",
    }
    height = 2.5 * len(algos) * len(_MAP_ROWS) + 1.0
    fig, axes = plt.subplots(
        len(algos) * len(_MAP_ROWS),
        len(columns),
        figsize=(3.4 * len(columns), height),
        squeeze=False,
    )
    for i, algo in enumerate(algos):
        for k, (row_name, off_metric, band_metric, cmap) in enumerate(_MAP_ROWS):
            for j, band in enumerate(columns):
                ax = axes[i * len(_MAP_ROWS) + k][j]
                is_off = band == "off"
                metric = off_metric if is_off else band_metric
                effect = metric.startswith("d_")
                source = effects if effect else env_cells
                grid = np.full((len(lrs), len(steps)), np.nan)
                sig = np.zeros_like(grid, dtype=bool)
                for row in source:
                    if row["algorithm"] != algo or row["band"] != band:
                        continue
                    r, c = lrs.index(row["lr"]), steps.index(row["steps"])
                    grid[r, c] = row[metric]
                    if effect:
                        sig[r, c] = row_name in row["significant"]
                if effect:
                    lim = lims[metric]
                    im = ax.imshow(
                        grid, cmap=cmap, vmin=-lim, vmax=lim, origin="lower", aspect="auto"
                    )
                elif row_name == "unstable":
                    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, origin="lower", aspect="auto")
                else:
                    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
                for r, c in itertools.product(range(len(lrs)), range(len(steps))):
                    if not np.isfinite(grid[r, c]):
                        continue
                    ax.text(
                        c,
                        r,
                        _cell_text(grid[r, c]) + ("*" if sig[r, c] else ""),
                        ha="center",
                        va="center",
                        fontsize=8,
                        bbox={"facecolor": "white", "alpha": 0.75, "lw": 0, "pad": 1},
                    )
                    if sig[r, c]:
                        ax.add_patch(
                            plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=2, ec="black")
                        )
                ax.set_xticks(range(len(steps)), [str(s) for s in steps])
                ax.set_yticks(range(len(lrs)), [f"{v:g}" for v in lrs])
                ax.set_xlabel("optimiser steps per rollout", fontsize=8)
                ax.set_ylabel(f"{algo.upper()}\nlearning rate", fontsize=8)
                ax.set_title(titles[(row_name, is_off)].format(b=band), fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    n_text = str(ns[0]) if len(ns) == 1 else f"{ns[0]} to {ns[-1]}"
    fig.suptitle(
        f"{env}: off-policy stress map ({n_text} seeds per cell). Columns: ERC off, then each ERC "
        "band; blue = better with ERC.\nFramed * = the 95% bootstrap CI of the difference to ERC "
        "off excludes 0. Empty cell = not run.\n"
        f"Unstable run = final entropy < {COLLAPSE_FACTOR:g}x its start, or any entropy > "
        f"{EXPLOSION_FACTOR:g}x its start, or the score lost > {SCORE_DROP_SHARE:.0%} of its "
        "best gain.",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))  # leave the three title lines free
    paths = _save(fig, Path(path))
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- report section


def _f(value: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}g}"


def _finished_stress_runs(experiment_dir: Path) -> list[Run]:
    # unfinished runs would enter with a partial final score
    return [r for r in load_runs(experiment_dir) if r.config.get("axes") and r.done]


def stress_markdown(
    experiment_dir: str | Path, *, plots: bool = True, baseline: str | Path | None = None
) -> list[str]:
    """The report section of a stress experiment: per env the figure, effects and claims.

    Only finished runs (with a ``done`` marker) count.

    Args:
        experiment_dir: the experiment's runs folder.
        plots: also draw the stress-map figures.
        baseline: another experiment folder (the config's ``baseline``) whose finished runs join
            the cells, e.g. the fixed band and ERC off for an adaptive-band experiment; then a
            section compares each adaptive cell with its fixed band (:func:`band_rule_table`).
    """
    experiment_dir = Path(experiment_dir)
    runs = _finished_stress_runs(experiment_dir)
    if not runs:
        return []
    notes: list[str] = []
    if baseline is not None:
        base_dir = Path(baseline)
        base_runs = _finished_stress_runs(base_dir) if base_dir.is_dir() else []
        if not base_runs:
            notes += [
                f"**Note:** the baseline experiment has no finished runs in {base_dir}: run "
                f"`erc-gym experiment {base_dir.name}` to compare with it.",
                "",
            ]
        runs += base_runs
    cells = cell_table(runs)
    md = [
        "## Off-policy stress map",
        "",
        f"Unstable run: final entropy < {COLLAPSE_FACTOR:g} x its first value (collapse), any "
        f"entropy > {EXPLOSION_FACTOR:g} x its first value (blow-up), or a final score that lost "
        f"more than {SCORE_DROP_SHARE:.0%} of the run's best gain over its first score. "
        "Differences are ERC minus the same algorithm without ERC at the same point; CIs are 95% "
        "percentile bootstrap over seeds (groups resampled separately); PoI = probability that an "
        "ERC run beats a no-ERC run. `*`: the CI excludes 0 (PoI: 0.5).",
        "",
        *notes,
    ]
    for env in dict.fromkeys(c["env"] for c in cells):
        md += [f"### {env}", ""]
        if plots:
            fig_dir = experiment_dir / "figures"
            fig_dir.mkdir(exist_ok=True)
            png = plot_stress_map(cells, env, fig_dir / f"{env}_stress_map")[0]
            md += [f"![{env} stress map]({png.relative_to(experiment_dir).as_posix()})", ""]
        md += ["The paper's claims at this scale:", ""]
        md += ["| claim (paper) | measured as | values | verdict |", "|---|---|---|---|"]
        md += [
            f"| {r['paper']} | {r['measured']} | {r['values']} | {r['verdict']} |"
            for r in claims_table(cells, env)
        ]
        md += [
            "",
            "| algorithm | band | steps | lr | n | final IQM [95% CI] | volatility | spikes "
            "| unstable | ERC clip | PPO clip | Δ score [CI] | PoI [CI] | Δ volatility [CI] |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        effects = {
            (e["algorithm"], e["band"], e["steps"], e["lr"]): e
            for e in effect_table([c for c in cells if c["env"] == env])
        }
        for c in (c for c in cells if c["env"] == env):
            e = effects.get((c["algorithm"], c["band"], c["steps"], c["lr"]))
            extra = ["", "", ""]
            if e is not None:
                star = {
                    k: "*" if k in e["significant"] else "" for k in ("score", "poi", "volatility")
                }
                extra = [
                    f"{_f(e['d_score'])} [{_f(e['d_score_lo'])}, "
                    f"{_f(e['d_score_hi'])}]{star['score']}",
                    f"{_f(e['poi'], 2)} [{_f(e['poi_lo'], 2)}, {_f(e['poi_hi'], 2)}]{star['poi']}",
                    f"{_f(e['d_volatility'])} [{_f(e['d_volatility_lo'])}, "
                    f"{_f(e['d_volatility_hi'])}]{star['volatility']}",
                ]
            md.append(
                f"| {c['algorithm']} | {c['band']} | {c['steps']} | {c['lr']:g} | {c['n']} | "
                f"{_f(c['iqm'])} [{_f(c['ci_low'])}, {_f(c['ci_high'])}] | "
                f"{_f(c['volatility'])} | {_f(c['spikes'])} | {_f(c['unstable'], 2)} | "
                f"{_f(c['erc_clip_fraction'])} | {_f(c['clip_fraction'])} | "
                + " | ".join(extra)
                + " |"
            )
        md.append("")
    if any(c["target"] is not None for c in cells):
        md += band_rule_markdown(cells)
    return md


def band_rule_markdown(cells: Sequence[dict[str, Any]]) -> list[str]:
    """Report section: the adaptive band against its fixed starting band, per cell
    (:func:`band_rule_table`)."""
    rows = band_rule_table(cells)
    md = [
        "## Adaptive band vs fixed band",
        "",
        "This project's adaptive band (`erc_target_clip_fraction`, `erc_gym.adaptive_band`; not "
        "the paper's) against each fixed band at the same point. Differences are "
        "adaptive minus fixed, with 95% bootstrap CIs over seeds; PoI = probability that an "
        "adaptive run beats a fixed-band run. ERC clip: mean share of samples ERC clipped, on "
        "the off-policy steps (what the target is about) / on all steps. Final band: the mean "
        "over seeds of the band in force at the last update. "
        "`*`: the CI excludes 0 (PoI: 0.5).",
        "",
    ]
    if not rows:
        md += [
            "No adaptive cell has a fixed-band cell at the same point (add the fixed band to "
            "the grid or name its experiment as `baseline`).",
            "",
        ]
        return md
    for rule in dict.fromkeys((r["target"], r["start"], r["fixed_band"]) for r in rows):
        group = [r for r in rows if (r["target"], r["start"], r["fixed_band"]) == rule]
        up = sum("score" in r["significant"] and r["d_score"] > 0 for r in group)
        down = sum("score" in r["significant"] and r["d_score"] < 0 for r in group)
        smooth = sum("volatility" in r["significant"] and r["d_volatility"] < 0 for r in group)
        rough = sum("volatility" in r["significant"] and r["d_volatility"] > 0 for r in group)
        md.append(
            f"* target {rule[0]:g} from {rule[1]} vs fixed {rule[2]}, {len(group)} cells: final "
            f"score higher in {up}, lower in {down} (CI excludes 0); entropy volatility lower in "
            f"{smooth}, higher in {rough}."
        )
    md += [
        "",
        "| env | algorithm | target | from | vs fixed | steps | lr | n "
        "| ERC clip off-policy / all, fixed -> adaptive "
        "| final band | final IQM fixed -> adaptive | Δ score [CI] | PoI [CI] "
        "| volatility fixed -> adaptive | Δ volatility [CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        star = {k: "*" if k in r["significant"] else "" for k in ("score", "poi", "volatility")}
        md.append(
            f"| {r['env']} | {r['algorithm']} | {r['target']:g} | {r['start']} | "
            f"{r['fixed_band']} | "
            f"{r['steps']} | {r['lr']:g} | {r['n_erc']} vs {r['n_off']} | "
            f"{_f(r['erc_clip_off_policy_fixed'], 2)} / {_f(r['erc_clip_fixed'], 2)} -> "
            f"{_f(r['erc_clip_off_policy_adaptive'], 2)} / {_f(r['erc_clip_adaptive'], 2)} | "
            f"({_f(r['erc_low_final'])}, {_f(r['erc_high_final'])}) | "
            f"{_f(r['iqm_fixed'])} -> {_f(r['iqm_adaptive'])} | "
            f"{_f(r['d_score'])} [{_f(r['d_score_lo'])}, {_f(r['d_score_hi'])}]{star['score']} | "
            f"{_f(r['poi'], 2)} [{_f(r['poi_lo'], 2)}, {_f(r['poi_hi'], 2)}]{star['poi']} | "
            f"{_f(r['volatility_fixed'])} -> {_f(r['volatility_adaptive'])} | "
            f"{_f(r['d_volatility'])} [{_f(r['d_volatility_lo'])}, "
            f"{_f(r['d_volatility_hi'])}]{star['volatility']} |"
        )
    md.append("")
    return md
