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
* :func:`method_table` -- in a config with ``methods`` (the rival methods, baselines and
  controls): every method against the reference (``base``) and ERC against every other method
  at the same point, paired by seed, Holm over each environment's family (or the declared
  ``primary`` comparisons);
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

from erc_gym.diagnostics import (
    entropy_jitter,
    entropy_steepest_fall,
    entropy_trend,
    entropy_volatility,
    grad_norm_spikes,
)
from erc_gym.lab.analysis import Run, load_runs
from erc_gym.lab.clipping import argmax_swap_share, low_entropy_excess, run_profile
from erc_gym.lab.stats import (
    Comparison,
    adjust,
    bootstrap_ci,
    compare,
    finite,
    finite_mean,
    iqm,
    probability_of_improvement,
)
from erc_gym.methods import acted_on_metric

__all__ = [
    "CLAIMS",
    "COLLAPSE_FACTOR",
    "COMPARED",
    "EXPLOSION_FACTOR",
    "SCORE_DROP_SHARE",
    "CellKey",
    "adjust_family",
    "band_rule_table",
    "cell_table",
    "claims_table",
    "effect_table",
    "finished_stress_runs",
    "instability",
    "method_table",
    "reference_method",
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


def acted_on(run: Run) -> tuple[str, float]:
    """``(metric, mean over the run)`` of how much the run's method acted
    (:func:`erc_gym.methods.acted_on_metric`: a share of tokens, a coefficient, ...)."""
    settings = {**(run.config.get("settings") or {}), **(run.config.get("env") or {})}
    name = acted_on_metric(settings, erc_on=run.config.get("erc") is not None)
    return name, _run_mean(run, name)


def seconds_per_update(run: Run) -> float:
    """Wall time of one update in seconds: the trainer's own timing (``update_time``: ERCPPO's
    ``time/train_seconds``, the LLM trainer's ``time_train``, the bandit's ``time_update`` with
    ``log_time``) where it logs one, else the run's training time (its ``done`` marker) over its
    updates (the logged gradient norms)."""
    own = _run_mean(run, "update_time")
    if math.isfinite(own):
        return own
    updates = run.series("grad_norm")[1].size
    return run.train_seconds() / updates if updates else math.nan


def _run_stats(run: Run, spike_k: float = 3.0) -> dict[str, float]:
    _, h = run.series("entropy")
    audit = run_profile(run)
    flags = instability(run)
    positive = bool(np.all(h > 0))
    return {
        "seed": float(run.seed),
        "score": run.final_score(),
        "volatility": entropy_volatility(h) if h.size >= 3 and positive else math.nan,
        "trend": entropy_trend(h) if positive else math.nan,
        "jitter": entropy_jitter(h) if positive else math.nan,
        "steepest_fall": entropy_steepest_fall(h) if positive else math.nan,
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
        "audited": float(audit is not None and audit.has_tokens),
        "clip_low_minus_high": low_entropy_excess(audit),
        "argmax_swap": argmax_swap_share(audit),
        "erc_low_final": _run_last(run, "erc_low"),
        "erc_high_final": _run_last(run, "erc_high"),
        "acted_on": acted_on(run)[1],
        "seconds_per_update": seconds_per_update(run),
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
    method: str | None = None
    """The label of the run's method (a config with ``methods``), else None."""

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
        method=None if axes.get("method") is None else str(axes["method"]),
    )


def cell_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per cell: the key fields, ``n``, per-seed ``scores`` and the cell statistics.

    ``iqm``/``ci_low``/``ci_high``: final score (95% percentile bootstrap, descriptive);
    ``volatility``, ``trend``, ``jitter``, ``steepest_fall`` (of log mean entropy, see
    :mod:`erc_gym.diagnostics`), ``spikes``, ``unstable`` (share of runs), ``erc_clip_fraction``,
    ``clip_fraction``, ``grad_norm``, ``entropy_old_clipped``, ``entropy_old_kept``: means over
    the cell's runs. ``per_run`` keeps each run's values (with its ``seed``) for the paired
    comparisons of :func:`effect_table`. In a config with ``methods``: ``method`` (its label,
    else None), ``acted_on_metric`` and ``acted_on`` (how much the method acted, mean over
    runs, :func:`acted_on`), ``control_band`` (the band a control imitates, else None) and
    ``seconds_per_update`` (:func:`seconds_per_update`).
    """
    cells: dict[CellKey, list[dict[str, float]]] = {}
    first: dict[CellKey, Run] = {}
    for run in runs:
        cells.setdefault(_key(run), []).append(_run_stats(run))
        first.setdefault(_key(run), run)
    rows = []
    for key, stats in cells.items():
        scores = [s["score"] for s in stats]
        lo, hi = math.nan, math.nan
        if finite(scores).size:
            lo, hi = bootstrap_ci(scores)
        settings = first[key].config.get("settings") or {}
        low, high = settings.get("control_low"), settings.get("control_high")
        control = None if low is None or high is None else (float(low), float(high))
        row: dict[str, Any] = {
            "key": key,
            "kind": first[key].kind,
            "method": key.method,
            "acted_on_metric": acted_on(first[key])[0],
            "control_band": control,
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
            if name not in ("score", "seed"):
                row[name] = finite_mean([s[name] for s in stats])
        row["per_run"] = stats
        rows.append(row)
    rows.sort(
        key=lambda r: (
            r["env"],
            r["algorithm"],
            r["band"] != "off",
            r["band"],
            r["steps"],
            r["lr"],
            r["method"] or "",
        )
    )
    return rows


#: The per-run values :func:`effect_table` compares, with the name of each difference.
COMPARED = (
    "score",
    "volatility",
    "trend",
    "jitter",
    "steepest_fall",
    "spikes",
    "unstable",
    "erc_clip_fraction",
)


def _by_seed(cell: dict[str, Any], name: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[name]) for r in cell["per_run"]}


def _compare(c: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Cell ``c`` against cell ``base`` at the same point: paired differences by seed.

    Each value of :data:`COMPARED` gets ``d_<name>`` (mean difference, ``c`` minus ``base``),
    ``d_<name>_lo`` / ``_hi`` (95% t-interval), ``p_<name>`` (t-test) and ``p_exact_<name>``
    (sign-flip or permutation) from :func:`erc_gym.lab.stats.compare`; ``tests`` keeps the
    :class:`~erc_gym.lab.stats.Comparison` objects for the family's adjustment. ``poi`` (with its
    bootstrap interval) describes the score, but decides nothing.
    """
    row: dict[str, Any] = {k: c[k] for k in ("env", "algorithm", "band", "steps", "lr")}
    if c.get("method") is not None:
        row["method"], row["against"] = c["method"], base["method"]
    row["n_erc"], row["n_off"] = c["n"], base["n"]
    row["poi"], row["poi_lo"], row["poi_hi"] = probability_of_improvement(
        c["scores"], base["scores"]
    )
    tests: dict[str, Comparison] = {}
    for name in COMPARED:
        t = compare(_by_seed(c, name), _by_seed(base, name))
        tests[name] = t
        row[f"d_{name}"], row[f"d_{name}_lo"], row[f"d_{name}_hi"] = t.diff, t.ci_low, t.ci_high
        row[f"p_{name}"], row[f"p_exact_{name}"] = t.p, t.p_exact
    row["paired"] = tests["score"].paired
    row["n_pairs"] = tests["score"].n
    row["tests"] = tests
    return row


def _selected(row: dict[str, Any], selector: dict[str, Any], reference: str | None) -> bool:
    """Whether an effect row is one of a config's ``primary`` cells (every given key matches;
    ``against`` defaults to the ``reference`` method where the selector names a ``method``)."""
    if "method" in selector and "against" not in selector:
        selector = {**selector, "against": reference}
    for key, want in selector.items():
        have = row.get({"steps_per_rollout": "steps", "erc": "band"}.get(key, key))
        if key == "erc":
            want = "off" if want is None else f"({want[0]:g}, {want[1]:g})"
        if isinstance(want, float) or isinstance(have, float):
            if have is None or not math.isclose(float(have), float(want), rel_tol=1e-9):
                return False
        elif have != want:
            return False
    return True


def adjust_family(
    rows: list[dict[str, Any]],
    primary: Sequence[dict[str, Any]] | None = None,
    method: str = "holm",
    reference: str | None = None,
) -> list[dict[str, Any]]:
    """Adjust the p-values of effect rows for multiple comparisons, per compared value.

    Without ``primary``, each environment's rows are one family per compared value (a map's
    cells; with methods, one family per environment and table: the comparisons with the
    reference, and ERC's with the other methods); with it (a config's ``primary`` list of cell
    selectors, e.g. ``{"env": "CartPole", "algorithm": "gppo", "steps_per_rollout": 16, "lr":
    0.001, "erc": [0.95, 1.05]}`` or ``{"env": "CartPole", "method": "erc", "against":
    "random-matched"}``), the selected rows form one family across environments, declared before
    the runs, and the other rows are exploratory families. Each row gets ``q_<name>`` (the
    adjusted p), ``primary`` (bool) and ``significant`` -- the names whose adjusted p is below
    0.05. ``reference``: the method a selector's ``against`` defaults to.
    """
    for row in rows:
        row["primary"] = bool(primary) and any(
            _selected(row, sel, reference) for sel in primary or ()
        )
    families: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = ("primary",) if row["primary"] else ("env", row["env"], row.get("table"))
        families.setdefault(key, []).append(row)
    for members in families.values():
        for name in COMPARED:
            adjusted = adjust([r["tests"][name] for r in members], method)
            for r, t in zip(members, adjusted, strict=True):
                r["tests"][name] = t
                r[f"q_{name}"] = t.p_adjusted
    for row in rows:
        row["significant"] = [n for n in COMPARED if row["tests"][n].significant()]
    return rows


def effect_table(
    cells: Sequence[dict[str, Any]], primary: Sequence[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """ERC's effect per cell: each ERC cell against the ERC-off cell of the same point.

    Keys: the cell's key fields, ``n_erc``, ``n_off``, ``n_pairs`` and ``paired`` (runs matched
    by seed), and for each value of :data:`COMPARED` the paired difference (ERC minus off)
    ``d_<name>`` with its 95% t-interval ``d_<name>_lo`` / ``_hi``, ``p_<name>``,
    ``p_exact_<name>`` and the Holm-adjusted ``q_<name>`` (:func:`adjust_family`, over the map's
    cells or over the config's ``primary`` cells); ``poi`` with ``poi_lo`` / ``poi_hi``
    (descriptive); ``significant`` -- the names whose adjusted p is below 0.05.
    """
    cells = [c for c in cells if c.get("method") is None]  # methods: method_table
    off = {(c["env"], c["algorithm"], c["steps"], c["lr"]): c for c in cells if c["band"] == "off"}
    out = []
    for c in cells:
        if c["band"] == "off":
            continue
        base = off.get((c["env"], c["algorithm"], c["steps"], c["lr"]))
        if base is not None:
            out.append(_compare(c, base))
    return adjust_family(out, primary)


def reference_method(methods: Sequence[str]) -> str | None:
    """The method every other is compared with: ``base`` when listed, else the first."""
    if not methods:
        return None
    return "base" if "base" in methods else methods[0]


def method_table(
    cells: Sequence[dict[str, Any]],
    primary: Sequence[dict[str, Any]] | None = None,
    reference: str = "base",
) -> list[dict[str, Any]]:
    """The methods compared at each point (env, algorithm, steps, lr) of a config with
    ``methods``, paired by seed.

    Two tables (``table``): ``"reference"`` -- every method against ``reference``; and
    ``"erc"`` -- each ERC method (a method with a band) against every other method but the
    reference, so that "ERC beats base" is checked against what could explain it: a random mask
    of the same share, the same step size, ``target_kl`` and the rivals. A control that imitates
    a band (``control_band``) is compared only with the ERC method of that band.

    Keys as in :func:`effect_table` (differences are ``method`` minus ``against``) plus
    ``method``, ``against``, ``table``, and the descriptive ``cost`` (the method's wall time per
    update over the compared method's, means over seeds). Adjusted by :func:`adjust_family`: one
    family per environment and table, or the declared ``primary`` comparisons.
    """
    points: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for c in cells:
        if c.get("method") is not None:
            points.setdefault((c["env"], c["algorithm"], c["steps"], c["lr"]), {})[c["method"]] = c
    out = []
    for methods in points.values():
        ref = methods.get(reference)
        pairs = [
            (c, ref, "reference") for c in methods.values() if ref is not None and c is not ref
        ]
        for c in methods.values():
            if c["key"].band is None:
                continue
            pairs += [
                (c, o, "erc")
                for o in methods.values()
                if o is not c
                and o["method"] != reference
                and o["control_band"] in (None, c["key"].band)
            ]
        for c, other, table in pairs:
            row = _compare(c, other)
            row["table"] = table
            mine, theirs = c["seconds_per_update"], other["seconds_per_update"]
            row["cost"] = mine / theirs if theirs > 0 else math.nan
            out.append(row)
    return adjust_family(out, primary, reference=reference)


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
    return adjust_family(out)


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

#: (claim id, the paper's statement (``docs/method.md``; the paper's numbers come from secondary
#: summaries), what is measured here). Every claim but the first counts a cell only where its
#: test is significant after Holm's adjustment over the map's cells: the comparative claims a
#: paired difference, the low-entropy claim the conditional clip probability
#: (:func:`erc_gym.lab.clipping.low_entropy_excess`) against 0.
CLAIMS: tuple[tuple[str, str, str], ...] = (
    (
        "clip_share",
        "ERC clips about 20% of tokens, PPO-clip about 0.02%",
        "ERC clip fraction >= 10x PPO clip fraction (same runs)",
    ),
    (
        "low_entropy",
        "the clipped tokens are mostly low-entropy ones",
        "among tokens with A != 0 on off-policy steps: ERC's clip probability in the lower half "
        "of the old-entropy deciles minus the upper half, > 0 (per run from clipping.jsonl; "
        "t-test of the seeds against 0, Holm over the cells)",
    ),
    (
        "smoother_entropy",
        "entropy curves are smoother with ERC",
        "entropy jitter (second differences of log H) lower with ERC",
    ),
    (
        "slower_decline",
        "(not a claim of the paper: what entropy volatility also measured)",
        "entropy trend (slope of log H per update) higher, i.e. a slower fall, with ERC",
    ),
    (
        "fewer_spikes",
        "gradient norms are smoother, fewer spikes",
        "grad-norm spikes per run lower with ERC",
    ),
    (
        "no_collapse",
        "no entropy collapse / explosion with ERC",
        "share of unstable runs lower with ERC",
    ),
    (
        "score",
        "accuracy gains over DAPO / GPPO",
        "final score higher with ERC",
    ),
)

#: Comparative claims: the compared value and the sign of the difference that supports the claim.
_CLAIM_TESTS = {
    "smoother_entropy": ("jitter", -1),
    "slower_decline": ("trend", +1),
    "fewer_spikes": ("spikes", -1),
    "no_collapse": ("unstable", -1),
    "score": ("score", +1),
}


def _claim_outcome(claim: str, cell: dict[str, Any], effect: dict[str, Any]) -> bool | None:
    """True (holds), False (the opposite holds) or None (not measurable, or for a comparative
    claim no significant difference in this cell)."""
    if claim == "clip_share":
        erc, ppo = cell["erc_clip_fraction"], cell["clip_fraction"]
        return None if not (math.isfinite(erc) and math.isfinite(ppo)) else erc >= 10 * ppo
    if claim == "low_entropy":
        test = effect.get("low_entropy_test")
        if test is None or not math.isfinite(test.p):
            return None
        return bool(test.diff > 0) if test.significant() else None
    if claim not in _CLAIM_TESTS:
        raise ValueError(f"unknown claim {claim!r}")
    name, sign = _CLAIM_TESTS[claim]
    if name not in effect["significant"]:
        return None
    return bool(sign * effect[f"d_{name}"] > 0)


def _low_entropy_tests(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Each effect row gets ``low_entropy_test``: the ERC cell's per-run
    :func:`~erc_gym.lab.clipping.low_entropy_excess` against 0 (a one-sample t-test over its
    seeds), Holm-adjusted over the cells that have it; None where no run has the measurement."""
    measured = []
    for cell, effect in pairs:
        values = {int(r["seed"]): float(r["clip_low_minus_high"]) for r in cell["per_run"]}
        effect["low_entropy_test"] = None
        if sum(math.isfinite(v) for v in values.values()) >= 2:
            measured.append((effect, compare(values, dict.fromkeys(values, 0.0))))
    for (effect, _), test in zip(
        measured, adjust([t for _, t in measured], "holm") if measured else [], strict=True
    ):
        effect["low_entropy_test"] = test


def _verdict(
    outcomes: list[tuple[CellKey, bool | None]],
    claim: str,
    tested: int | None = None,
    audited: bool = False,
) -> str:
    """``outcomes``: every cell with a baseline, True / False / None (:func:`_claim_outcome`);
    for the low-entropy claim, ``tested``: the cells where it could be measured, ``audited``:
    whether any run has the audit it is measured from."""
    if claim == "low_entropy" and not audited:
        return "not measurable here (no clipping.jsonl: runs from before the audit)"
    if claim == "low_entropy" and not tested:
        return "too few clipped tokens with A != 0 to measure (in every cell)"
    if claim in _CLAIM_TESTS or claim == "low_entropy":
        held = sum(ok is True for _, ok in outcomes)
        against = sum(ok is False for _, ok in outcomes)
        n = tested if claim == "low_entropy" and tested is not None else len(outcomes)
        if not held and not against:
            return f"no significant difference in {n} cells"
        where = _depends([(k, ok is True) for k, ok in outcomes]) if held else ""
        return f"holds in {held}, opposite in {against} of {n} cells{where}"
    measured = [(k, ok) for k, ok in outcomes if ok is not None]
    if not measured:
        return "not measurable here"
    held_keys = [k for k, ok in measured if ok]
    if len(held_keys) == len(measured):
        return f"holds ({len(held_keys)}/{len(measured)} cells)"
    if not held_keys:
        return f"does not hold (0/{len(measured)} cells)"
    return f"{len(held_keys)}/{len(measured)} cells" + _depends(
        [(k, bool(ok)) for k, ok in measured]
    )


def _depends(outcomes: list[tuple[CellKey, bool]]) -> str:
    """``"; depends on <axis>: holds at ..."`` when one axis separates the outcomes, else ``""``."""
    for axis in ("steps", "lr", "algorithm", "band"):
        by_value: dict[Any, set[bool]] = {}
        for key, ok in outcomes:
            by_value.setdefault(getattr(key, axis), set()).add(ok)
        if len(by_value) > 1 and all(len(v) == 1 for v in by_value.values()):
            where = sorted(str(v) for v, s in by_value.items() if True in s)
            name = {"steps": "steps per rollout", "lr": "lr"}.get(axis, axis)
            return f"; depends on {name}: holds at {', '.join(where)}"
    return ""


def claims_table(
    cells: Sequence[dict[str, Any]], env: str, primary: Sequence[dict[str, Any]] | None = None
) -> list[dict[str, str]]:
    """The paper's claims for one environment: statement, measurement, per-cell verdict.

    Rows: ``claim``, ``paper``, ``measured`` (what is compared), ``values`` (the ranges seen),
    ``verdict``. Only ERC cells with an ERC-off partner count. A comparative claim holds in a
    cell where the paired difference is significant in its direction after the adjustment of
    :func:`adjust_family`; a verdict "depends on <axis>" means the outcome is constant along
    every other axis value of that axis.
    """
    env_cells = [c for c in cells if c["env"] == env]
    effects = {
        (e["algorithm"], e["band"], e["steps"], e["lr"]): e
        for e in effect_table(cells, primary)
        if e["env"] == env
    }
    pairs = [
        (c, effects[(c["algorithm"], c["band"], c["steps"], c["lr"])])
        for c in env_cells
        if (c["algorithm"], c["band"], c["steps"], c["lr"]) in effects
    ]
    _low_entropy_tests(pairs)
    rows = []
    for claim, paper, measured in CLAIMS:
        outcomes = [(cell["key"], _claim_outcome(claim, cell, effect)) for cell, effect in pairs]
        rows.append(
            {
                "claim": claim,
                "paper": paper,
                "measured": measured,
                "values": _claim_values(claim, [p[0] for p in pairs], [p[1] for p in pairs]),
                "verdict": _verdict(
                    outcomes,
                    claim,
                    sum(e.get("low_entropy_test") is not None for _, e in pairs),
                    any(r["audited"] for c, _ in pairs for r in c["per_run"]),
                ),
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
            f"P(clip | A != 0), low minus high entropy half "
            f"{_rng([c['clip_low_minus_high'] for c in cells])}; (means: clipped "
            f"{_rng([c['entropy_old_clipped'] for c in cells])}, kept "
            f"{_rng([c['entropy_old_kept'] for c in cells])} nats)"
        )
    name = _CLAIM_TESTS[claim][0]
    label = {"unstable": "unstable share", "spikes": "spikes/run"}.get(name, name)
    return f"Δ {label} {_rng([e[f'd_{name}'] for e in effects])}"


def finished_stress_runs(experiment_dir: str | Path) -> list[Run]:
    """The finished runs of a stress experiment (unfinished runs would enter with a partial final
    score)."""
    return [r for r in load_runs(experiment_dir) if r.config.get("axes") and r.done]
