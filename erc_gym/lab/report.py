"""Markdown (and HTML) report of an experiment folder: the final-score table and the figures.

``write_report(runs/<experiment>)`` writes ``report.md`` and ``report.html`` next to the runs,
with one table per environment -- final score IQM and 95% bootstrap CI over seeds, the per-seed
scores, and the entropy diagnostics of :mod:`erc_gym.diagnostics` -- followed by the figures of
:mod:`erc_gym.lab.plots` (generated if missing). A stress experiment adds the stress-map section
(:func:`stress_markdown`): per environment the figure, the paper's claims at this scale and ERC's
effect per cell, and for an adaptive band its comparison with the fixed bands
(:func:`band_rule_markdown`). A comparison of methods (a config with ``methods``) adds the
leaderboard section (:func:`methods_markdown`): per environment and point the methods against the
reference (``base``) and ERC against each other method, paired by seed.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erc_gym.atomic import atomic_write
from erc_gym.lab.analysis import (
    SCORE_LABELS,
    Run,
    grid_order,
    load_runs,
    stale_runs,
    summarize,
    unreadable_runs,
)
from erc_gym.lab.clipping import ClipProfile, low_entropy_excess, merge, run_profile
from erc_gym.lab.grid import method_entries
from erc_gym.lab.plots import (
    plot_experiment,
    plot_leaderboard,
    plot_stress_map,
    plot_who_gets_clipped,
)
from erc_gym.lab.rundir import read_done
from erc_gym.lab.stats import Comparison, compare, finite_mean
from erc_gym.lab.stress import (
    COLLAPSE_FACTOR,
    EXPLOSION_FACTOR,
    SCORE_DROP_SHARE,
    band_rule_table,
    cell_table,
    claims_table,
    effect_table,
    finished_stress_runs,
    method_table,
    reference_method,
)

__all__ = [
    "COLUMNS",
    "band_rule_markdown",
    "clipping_markdown",
    "effects_markdown",
    "markdown_table",
    "methods_markdown",
    "stress_markdown",
    "write_report",
]

#: (summary key, column title) of the report tables.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("variant", "variant"),
    ("runs", "runs done"),
    ("score_start", "first score (mean)"),
    ("iqm_ci", "final score IQM [95% CI]"),
    ("per_seed", "per seed"),
    ("score_mean", "mean score over training"),
    ("entropy_final", "final entropy"),
    ("entropy_trend", "entropy trend / update"),
    ("entropy_jitter", "entropy jitter"),
    ("entropy_volatility", "entropy volatility"),
    ("grad_norm_spikes", "grad-norm spikes / run"),
    ("erc_clip_fraction", "ERC clip fraction"),
    ("clip_fraction", "PPO clip fraction"),
    ("tv_unsampled", "TV un-sampled"),
    ("h_old", "H_old clipped / kept"),
)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _cells(row: dict[str, Any]) -> list[str]:
    out = []
    for key, _ in COLUMNS:
        if key == "iqm_ci":
            out.append(f"{_fmt(row['iqm'])} [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]")
        elif key == "h_old":
            out.append(f"{_fmt(row['entropy_old_clipped'])} / {_fmt(row['entropy_old_kept'])}")
        elif key == "per_seed":
            text = ", ".join(_fmt(v) for v in row["per_seed"]) or "–"
            if row.get("unfinished"):
                text += " (unfinished: seed " + ", ".join(map(str, row["unfinished"])) + ")"
            if row.get("damaged"):
                text += " (damaged, not counted: seed " + ", ".join(map(str, row["damaged"])) + ")"
            out.append(text)
        else:
            out.append(_fmt(row[key]))
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`erc_gym.lab.analysis.summarize` rows."""
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write_report(experiment_dir: str | Path, *, plots: bool = True) -> Path:
    """Write ``report.md`` and ``report.html`` for an experiment folder; returns the .md path."""
    experiment_dir = Path(experiment_dir)
    runs = load_runs(experiment_dir)
    unreadable = unreadable_runs(experiment_dir)
    if not runs:
        found = "; ".join(f"{p}: {why}" for p, why in unreadable[:3])
        raise FileNotFoundError(
            f"no runs (config.json) below {experiment_dir}"
            + (f"; skipped {len(unreadable)} run folders, e.g. {found}" if unreadable else "")
        )
    spec_path = experiment_dir / "experiment.json"
    try:
        spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    except ValueError as err:  # the runner writes it atomically: this is a hand edit
        raise ValueError(
            f"{spec_path}: not valid JSON ({err}); running the experiment again rewrites it"
        ) from None
    if not isinstance(spec, dict):
        raise ValueError(f"{spec_path}: expected a JSON object, got {spec!r:.60}")
    # a stress grid has dozens of variants per env: its figure is the stress map, not the curves
    figures = plot_experiment(experiment_dir) if plots and not spec.get("axes") else []
    rows = summarize(runs)  # load_runs keeps the config's grid order (env, algorithm, band)
    grid = grid_order(experiment_dir) or []
    for row in rows:  # n finished / n the config declares (runs not started have no folder)
        declared = sum(variant == row["variant"] for variant, _ in grid)
        done = int(row["runs"].split("/")[0])
        row["runs"] = f"{done}/{max(declared, int(row['runs'].split('/')[1]))}"
    envs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        envs.setdefault(row["env"], []).append(row)
    name = spec.get("name", experiment_dir.name)
    md = [f"# Experiment `{name}`", ""]
    if spec.get("description"):
        md += [spec["description"], ""]
    md += [
        f"Reproduce: `erc-gym experiment {name}` then `erc-gym report {experiment_dir}`.",
        "",
        "Final score: the last logged score of each run; IQM = interquartile mean over seeds, "
        "95% percentile-bootstrap CI over seeds (descriptive: with few seeds it is too narrow; "
        "differences are tested in the paired table below). Mean score over training: "
        "the average of all logged scores (an area under the "
        "learning curve; higher = learnt sooner). Entropy trend: least-squares slope of log mean "
        "entropy per update (-0.01 = falls about 1% per update); entropy jitter: its noise "
        "around the trend (std of second differences / sqrt 6); entropy volatility: std of the "
        "per-update change of log mean entropy, which mixes the two (a slower fall also lowers "
        "it). Grad-norm spikes: updates above 3x the running median. "
        "Clip fractions, TV on un-sampled actions and the mean old entropy of ERC-clipped / kept "
        "states (tokens): means over training. "
        "`–`: not logged for this run type.",
        "",
    ]
    page = [f"<h1>Experiment <code>{html.escape(name)}</code></h1>"]
    if spec.get("description"):
        page.append(f"<p>{html.escape(spec['description'])}</p>")
    notes = []
    unfinished = sum(not r.done and r.damaged is None for r in runs)
    if unfinished:
        notes.append(
            f"{unfinished} of {len(runs)} runs are unfinished and left out of every column "
            "(see 'runs done'); `erc-gym experiment` resumes them."
        )
    notes += _integrity_notes(runs, unreadable, experiment_dir)
    stale = stale_runs(experiment_dir)
    if stale:
        shown = ", ".join(p.relative_to(experiment_dir).as_posix() for p in stale[:6])
        notes.append(
            f"{len(stale)} run folders are not in the current config and are not reported: "
            f"{shown}{', ...' if len(stale) > 6 else ''}."
        )
    for note in notes:
        md += [f"**Note:** {note}", ""]
        page.append(f"<p><b>Note:</b> {html.escape(note)}</p>")
    cells = [] if spec.get("axes") else cell_table([r for r in runs if r.done])
    for env, env_rows in envs.items():
        kind = env_rows[0]["kind"]
        md += [f"## {env}", "", f"Score: {SCORE_LABELS.get(kind, 'score')}.", ""]
        md += [markdown_table(env_rows), ""]
        md += _paired_effects(cells, env, _primary(experiment_dir))
        page.append(f"<h2>{html.escape(env)}</h2><table border='1' cellpadding='4'>")
        page.append("<tr>" + "".join(f"<th>{html.escape(t)}</th>" for _, t in COLUMNS) + "</tr>")
        for r in env_rows:
            page.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>")
        page.append("</table>")
        for fig in figures:
            if fig.suffix == ".png" and fig.name.startswith(f"{env}_"):
                rel = fig.relative_to(experiment_dir)
                md += [f"![{fig.stem}]({rel.as_posix()})", ""]
                page.append(f"<p><img src='{rel.as_posix()}' style='max-width:100%'></p>")
    clipped = clipping_markdown(runs, experiment_dir, plots=plots)
    if clipped:
        md += clipped
        page += [
            f"<p><img src='{html.escape(line.split('](')[1][:-1])}' style='max-width:100%'></p>"
            for line in clipped
            if line.startswith("![")
        ]
    if spec.get("methods"):
        md += methods_markdown(experiment_dir, spec, plots=plots)
    elif spec.get("axes"):
        baseline = spec.get("baseline")
        md += stress_markdown(
            experiment_dir,
            plots=plots,
            baseline=None if baseline is None else experiment_dir.parent / baseline,
        )
    # written atomically: two processes reporting at once never leave a mixed file
    out = experiment_dir / "report.md"
    atomic_write(out, "\n".join(md), fsync=False)
    atomic_write(
        experiment_dir / "report.html",
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        + html.escape(name)
        + "</title></head><body>"
        + "\n".join(page)
        + "</body></html>\n",
        fsync=False,
    )
    return out


def _integrity_notes(
    runs: Sequence[Run], unreadable: Sequence[tuple[Path, str]], experiment_dir: Path
) -> list[str]:
    """The report's notes on what it could not use: every run folder skipped, every run marked
    done whose log changed since, every log line that could not be read, and the finished runs
    whose older ``done`` marker has no checksum to check their log against."""

    def rel(path: Path) -> str:
        return path.relative_to(experiment_dir).as_posix()

    notes = []
    if unreadable:
        notes.append(
            f"{len(unreadable)} run folders could not be read and are not reported: "
            + "; ".join(f"{rel(p)}: {why}" for p, why in unreadable)
            + "."
        )
    damaged = [r for r in runs if r.damaged is not None]
    if damaged:
        notes.append(
            f"{len(damaged)} runs marked done are not counted, as their log is not the one they "
            "finished with: "
            + "; ".join(f"{rel(r.path)}: {r.damaged}" for r in damaged)
            + ". Delete such a run's folder and run the experiment again to redo it."
        )
    lines = [r for r in runs if r.skipped_lines]
    if lines:
        notes.append(
            "Lines of metrics.jsonl that could not be read and are left out: "
            + "; ".join(
                f"{rel(r.path)}: line{'s' if len(r.skipped_lines) > 1 else ''} "
                + ", ".join(map(str, r.skipped_lines))
                for r in lines
            )
            + "."
        )
    unchecked = []
    for r in runs:
        with contextlib.suppress(OSError, ValueError):
            marker = read_done(r.path)
            if r.done and marker is not None and marker.metrics_sha256 is None:
                unchecked.append(r)
    if unchecked:
        notes.append(
            f"{len(unchecked)} finished runs have a done marker written before markers recorded "
            "a checksum of the log (an older erc-gym): counted, but their metrics.jsonl cannot "
            "be checked for damage."
        )
    return notes


# ---------------------------------------------------------------- who gets clipped

#: Variants drawn in a "who gets clipped" figure (ERC-on variants first; the table has all).
CLIPPING_FIGURE_VARIANTS = 6


def clipping_markdown(
    runs: Sequence[Run], experiment_dir: str | Path, *, plots: bool = True
) -> list[str]:
    """The report section "Who gets clipped" from the runs' ``clipping.jsonl``
    (:mod:`erc_gym.lab.clipping`): per environment the figure
    (:func:`~erc_gym.lab.plots.plot_who_gets_clipped`, ``figures/<env>_who_gets_clipped``) and
    a table per variant. Finished runs only; ``[]`` when no run has the file."""
    experiment_dir = Path(experiment_dir)
    done = [r for r in runs if r.done]
    audits = {r.path: run_profile(r) for r in done}
    if not any(audits.values()):
        return []
    md = [
        "## Who gets clipped",
        "",
        "From each run's `clipping.jsonl` (one line per update, written by the trainer): the "
        "tokens (states) whose entropy ratio left the ERC band on the off-policy optimiser steps "
        "of a rollout -- those ERC stopped, or with ERC off those ERC(0.95, 1.05) would have "
        "stopped. Old-entropy deciles are the update's own, of its tokens with A != 0. "
        "P(clip | A != 0): among tokens with a "
        "non-zero advantage (a token with A = 0 has no gradient to stop; GRPO's zero-advantage "
        "groups are the near-deterministic, low-entropy contexts, which is why a comparison of "
        "the mean old entropy of clipped and kept tokens is confounded). Low - high: that "
        "probability in the lower half of the deciles minus the upper half, per run, mean over "
        "seeds with its 95% t-interval (> 0: low-entropy tokens are clipped more often). "
        "Arg-max swaps: audited states whose most likely action changed in an update while "
        "their entropy ratio stayed in the band (the ratio cannot see them).",
        "",
    ]
    by_env: dict[str, dict[str, list[Run]]] = {}
    for run in done:
        by_env.setdefault(run.env_label, {}).setdefault(run.variant, []).append(run)
    for env, variants in by_env.items():
        rows = []
        for variant, group in variants.items():
            found = [a for r in group if (a := audits[r.path]) is not None]
            if not found:
                continue
            excess = {r.seed: low_entropy_excess(audits[r.path]) for r in group}
            rows.append((variant, merge(found), compare(excess, dict.fromkeys(excess, 0.0))))
        if not rows:
            continue
        md += [f"### {env}", ""]
        if plots:
            chosen = sorted(rows, key=lambda r: not r[1].erc)[:CLIPPING_FIGURE_VARIANTS]
            fig_dir = experiment_dir / "figures"
            fig_dir.mkdir(exist_ok=True)
            paths = plot_who_gets_clipped(
                [(v, p) for v, p, _ in chosen],
                f"{experiment_dir.name} / {env}",
                fig_dir / f"{env}_who_gets_clipped",
            )
            if paths:
                rel = paths[0].relative_to(experiment_dir).as_posix()
                md += [f"![{env} who gets clipped]({rel})", ""]
                if len(rows) > len(chosen):
                    md += [
                        f"The figure draws {len(chosen)} of the {len(rows)} variants (ERC-on "
                        "ones first); the table has all.",
                        "",
                    ]
        md += [
            "| variant | ERC | updates | outside the band (off-policy) | P(clip \\| A != 0), "
            "lowest / highest decile | low - high [95% CI] | outside with A = 0 "
            "| arg-max swaps in band |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for variant, p, test in rows:
            md.append(_clipping_row(variant, p, test))
        md.append("")
    return md


def _clipping_row(variant: str, p: ClipProfile, test: Comparison) -> str:
    if p.has_tokens:
        b = p.bins["h_old_bins"]
        total, outside = b["n"].sum(), b["outside"].sum()
        rate = p.rate("h_old_adv_bins")
        finite_rate = rate[np.isfinite(rate)]
        ends = f"{_f(finite_rate[0], 2)} / {_f(finite_rate[-1], 2)}" if finite_rate.size else "–"
        zero = (outside - b["outside_adv"].sum()) / outside if outside else math.nan
        share = f"{_f(outside / total if total else math.nan, 3)}"
        excess = f"{_f(test.diff, 2)} [{_f(test.ci_low, 2)}, {_f(test.ci_high, 2)}]"
    else:
        ends = share = excess = "–"
        zero = math.nan
    st = p.states
    swaps = (
        f"{st.get('argmax_changed_in_band', 0)} of {st['states']} states"
        if st.get("states")
        else "–"
    )
    return (
        f"| {variant} | {'on' if p.erc else 'off (would-be)'} | {p.updates} | {share} | {ends} "
        f"| {excess} | {_f(zero, 2)} | {swaps} |"
    )


# ---------------------------------------------------------------- report section


def _f(value: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}g}"


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
    runs = finished_stress_runs(experiment_dir)
    if not runs:
        return []
    notes: list[str] = []
    if baseline is not None:
        base_dir = Path(baseline)
        base_runs = finished_stress_runs(base_dir) if base_dir.is_dir() else []
        if not base_runs:
            notes += [
                f"**Note:** the baseline experiment has no finished runs in {base_dir}: run "
                f"`erc-gym experiment {base_dir.name}` to compare with it.",
                "",
            ]
        runs += base_runs
    cells = cell_table(runs)
    primary = _primary(experiment_dir)
    md = [
        "## Off-policy stress map",
        "",
        f"Unstable run: final entropy < {COLLAPSE_FACTOR:g} x its first value (collapse), any "
        f"entropy > {EXPLOSION_FACTOR:g} x its first value (blow-up), or a final score that lost "
        f"more than {SCORE_DROP_SHARE:.0%} of the run's best gain over its first score. "
        + _EFFECTS_TEXT.format(
            method="ERC", base="the same algorithm without ERC at the same point"
        )
        + (
            " This experiment declares primary cells (`primary` in its config): they form one "
            "family for the adjustment, the other cells are exploratory."
            if primary
            else ""
        ),
        "",
        *notes,
    ]
    for env in dict.fromkeys(c["env"] for c in cells):
        md += [f"### {env}", ""]
        if plots:
            fig_dir = experiment_dir / "figures"
            fig_dir.mkdir(exist_ok=True)
            png = plot_stress_map(cells, env, fig_dir / f"{env}_stress_map", primary)[0]
            md += [f"![{env} stress map]({png.relative_to(experiment_dir).as_posix()})", ""]
        md += ["The paper's claims at this scale:", ""]
        md += ["| claim (paper) | measured as | values | verdict |", "|---|---|---|---|"]
        md += [
            f"| {r['paper']} | {r['measured']} | {r['values']} | {r['verdict']} |"
            for r in claims_table(cells, env, primary)
        ]
        md += ["", *effects_markdown(cells, env, primary)]
    if any(c["target"] is not None for c in cells):
        md += band_rule_markdown(cells)
    return md


_EFFECTS_TEXT = (
    "Differences are {method} minus {base}, paired by seed (each seed's two runs share the "
    "environment's seeds and the initial weights): the mean of the per-seed differences with its "
    "95% Student-t interval; p: the same t-test; p exact: the sign-flip test, which assumes no "
    "distribution but cannot go below 2 / 2^n with n seeds (0.25 at 3, 0.0625 at 5); q: p after "
    "Holm's adjustment over the map's cells. `*`: q < 0.05. PoI (probability that a run of "
    "{method} beats a baseline run) and the IQMs describe, they decide nothing. Jitter: noise "
    "of log mean entropy around its trend; trend: its slope per update (docs/statistics.md)."
)


def _primary(experiment_dir: Path) -> list[dict[str, Any]] | None:
    """The ``primary`` cells its ``experiment.json`` declares, if any."""
    try:
        spec = json.loads((experiment_dir / "experiment.json").read_text())
    except (OSError, ValueError):
        return None
    primary = spec.get("primary") if isinstance(spec, dict) else None
    return primary if isinstance(primary, list) and primary else None


def _ci(row: dict[str, Any], name: str) -> str:
    star = "*" if name in row["significant"] else ""
    return f"{_f(row[f'd_{name}'])} [{_f(row[f'd_{name}_lo'])}, {_f(row[f'd_{name}_hi'])}]{star}"


def _p(row: dict[str, Any], name: str) -> str:
    p, p_exact, q = row[f"p_{name}"], row[f"p_exact_{name}"], row[f"q_{name}"]
    return f"{_f(p, 2)} / {_f(p_exact, 2)} / {_f(q, 2)}"


def effects_markdown(
    cells: Sequence[dict[str, Any]], env: str, primary: Sequence[dict[str, Any]] | None = None
) -> list[str]:
    """The cell table of one environment of a map: per cell its statistics, and ERC's paired
    effect where the cell has an ERC-off partner (:func:`erc_gym.lab.stress.effect_table` over
    all ``cells``, so that declared ``primary`` cells form one family across environments)."""
    effects = {
        (e["algorithm"], e["band"], e["steps"], e["lr"]): e
        for e in effect_table(cells, primary)
        if e["env"] == env
    }
    cells = [c for c in cells if c["env"] == env]
    md = [
        "| algorithm | band | steps | lr | n | final IQM [95% CI] | jitter | trend | spikes "
        "| unstable | ERC clip | PPO clip | Δ score [CI] | p / p exact / q | PoI "
        "| Δ jitter [CI] | Δ trend [CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        e = effects.get((c["algorithm"], c["band"], c["steps"], c["lr"]))
        extra = ["", "", "", "", ""]
        if e is not None:
            extra = [
                _ci(e, "score") + ("" if e["paired"] else " (unpaired)"),
                _p(e, "score"),
                _f(e["poi"], 2),
                _ci(e, "jitter"),
                _ci(e, "trend"),
            ]
        md.append(
            f"| {c['algorithm']} | {c['band']} | {c['steps']} | {c['lr']:g} | {c['n']} | "
            f"{_f(c['iqm'])} [{_f(c['ci_low'])}, {_f(c['ci_high'])}] | "
            f"{_f(c['jitter'])} | {_f(c['trend'])} | {_f(c['spikes'])} | "
            f"{_f(c['unstable'], 2)} | "
            f"{_f(c['erc_clip_fraction'])} | {_f(c['clip_fraction'])} | " + " | ".join(extra) + " |"
        )
    md.append("")
    return md


def _paired_effects(
    cells: Sequence[dict[str, Any]], env: str, primary: Sequence[dict[str, Any]] | None
) -> list[str]:
    """ERC against ERC off for one environment of an experiment without stress axes."""
    rows = [e for e in effect_table(cells, primary) if e["env"] == env]
    if not rows:
        return []
    md = [
        "ERC against the same algorithm without ERC. "
        + _EFFECTS_TEXT.format(method="ERC", base="off").replace("the map's cells", "the table"),
        "",
        "| algorithm | band | seeds paired | Δ final score [CI] | p / p exact / q | PoI "
        "| Δ entropy jitter [CI] | Δ entropy trend [CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        paired = str(e["n_pairs"]) if e["paired"] else f"none ({e['n_erc']} vs {e['n_off']})"
        md.append(
            f"| {e['algorithm']} | {e['band']} | {paired} | {_ci(e, 'score')} | "
            f"{_p(e, 'score')} | {_f(e['poi'], 2)} | {_ci(e, 'jitter')} | {_ci(e, 'trend')} |"
        )
    return [*md, ""]


def band_rule_markdown(cells: Sequence[dict[str, Any]]) -> list[str]:
    """Report section: the adaptive band against its fixed starting band, per cell
    (:func:`band_rule_table`)."""
    rows = band_rule_table(cells)
    md = [
        "## Adaptive band vs fixed band",
        "",
        "This project's adaptive band (`erc_target_clip_fraction`, `erc_gym.adaptive_band`; not "
        "the paper's) against each fixed band at the same point. "
        + _EFFECTS_TEXT.format(method="adaptive", base="fixed")
        + " ERC clip: mean share of samples ERC clipped, on the off-policy steps (what the target "
        "is about) / on all steps. Final band: the mean over seeds of the band in force at the "
        "last update.",
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
        smooth = sum("jitter" in r["significant"] and r["d_jitter"] < 0 for r in group)
        rough = sum("jitter" in r["significant"] and r["d_jitter"] > 0 for r in group)
        md.append(
            f"* target {rule[0]:g} from {rule[1]} vs fixed {rule[2]}, {len(group)} cells: final "
            f"score higher in {up}, lower in {down} (q < 0.05); entropy jitter lower in "
            f"{smooth}, higher in {rough}."
        )
    md += [
        "",
        "| env | algorithm | target | from | vs fixed | steps | lr | n "
        "| ERC clip off-policy / all, fixed -> adaptive "
        "| final band | final IQM fixed -> adaptive | Δ score [CI] | p / p exact / q | PoI "
        "| volatility fixed -> adaptive | Δ jitter [CI] | Δ trend [CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['env']} | {r['algorithm']} | {r['target']:g} | {r['start']} | "
            f"{r['fixed_band']} | "
            f"{r['steps']} | {r['lr']:g} | {r['n_erc']} vs {r['n_off']} | "
            f"{_f(r['erc_clip_off_policy_fixed'], 2)} / {_f(r['erc_clip_fixed'], 2)} -> "
            f"{_f(r['erc_clip_off_policy_adaptive'], 2)} / {_f(r['erc_clip_adaptive'], 2)} | "
            f"({_f(r['erc_low_final'])}, {_f(r['erc_high_final'])}) | "
            f"{_f(r['iqm_fixed'])} -> {_f(r['iqm_adaptive'])} | "
            f"{_ci(r, 'score')} | {_p(r, 'score')} | {_f(r['poi'], 2)} | "
            f"{_f(r['volatility_fixed'])} -> {_f(r['volatility_adaptive'])} | "
            f"{_ci(r, 'jitter')} | {_ci(r, 'trend')} |"
        )
    md.append("")
    return md


# ---------------------------------------------------------------- methods compared


_METHODS_TEXT = (
    "Differences are the method minus the one compared with, paired by seed (each seed's runs "
    "share the environment's seeds, the initial weights and the first batch): the mean of the "
    "per-seed differences with its 95% Student-t interval; p: the same t-test; p exact: the "
    "sign-flip test (no distributional assumption; it cannot go below 2 / 2^n with n seeds, "
    "0.002 at 10); q: p after Holm's adjustment over the family -- per environment, the "
    "comparisons with `{reference}` are one family and ERC's with the other methods another. "
    "`*`: q < 0.05. Entropy trend: slope of log mean entropy per update; jitter: its noise "
    "around the trend (docs/statistics.md)."
)


def _method_order(spec: dict[str, Any]) -> list[str]:
    try:
        return [m.label for m in method_entries(spec.get("methods") or [])]
    except (KeyError, TypeError, ValueError):  # a hand-edited experiment.json
        return []


def _share(values: Sequence[float]) -> str:
    n = len([v for v in values if math.isfinite(v)])
    return "–" if not n else f"{sum(v > 0 for v in values if math.isfinite(v))}/{n}"


def _cost(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.2f}x"


def methods_markdown(
    experiment_dir: str | Path, spec: dict[str, Any], *, plots: bool = True
) -> list[str]:
    """The report section of a comparison of methods (a config with ``methods``).

    Per environment and point (algorithm, steps per rollout, lr): a figure of every method's
    paired difference to the reference in final score (:func:`erc_gym.lab.plots.plot_leaderboard`),
    the leaderboard -- final score, paired difference to the reference with its 95% t-interval,
    p / exact p / Holm-adjusted q, the share of unstable runs, entropy trend and jitter, how much
    the method acted (:func:`erc_gym.lab.stress.acted_on`) and its wall time per update relative
    to the reference -- and ERC against each other method (:func:`erc_gym.lab.stress.method_table`).
    Only finished runs count.
    """
    experiment_dir = Path(experiment_dir)
    runs = [r for r in load_runs(experiment_dir) if r.done]
    if not runs:
        return []
    order = _method_order(spec)
    reference = reference_method(order) or "base"
    primary = _primary(experiment_dir)
    cells = [c for c in cell_table(runs) if c["method"] is not None]
    rows = method_table(cells, primary, reference=reference)
    rank = {m: i for i, m in enumerate(order)}
    md = [
        "## Methods compared",
        "",
        f"Every method against `{reference}` at the same point (environment, algorithm, steps "
        "per rollout, learning rate), and ERC against every other method there: does ERC beat "
        "the reference, and does it beat the controls that could explain that (a random mask of "
        "ERC's share, the same step size) and the standard tools for the problem? "
        + _METHODS_TEXT.format(reference=reference)
        + (
            " This experiment declares primary comparisons (`primary` in its config, marked "
            "(P)): they form one family of their own; the others are exploratory."
            if primary
            else ""
        )
        + f" Unstable: runs with an entropy collapse (final < {COLLAPSE_FACTOR:g}x the first), "
        f"a blow-up (> {EXPLOSION_FACTOR:g}x) or a score that lost more than "
        f"{SCORE_DROP_SHARE:.0%} of its best gain. Acted on: the method's own metric, mean over "
        "training (a share of tokens / samples for ERC and the token gates, the kept share of "
        "the step for `equal-step`, optimiser steps taken per update for `target-kl`, the "
        "coefficient or the KL for the regularisers, PPO's clip fraction otherwise). Cost: wall "
        f"time per update over `{reference}`'s (means over seeds; the trainer's own timing where "
        "it logs one, else the run's training time over its updates; on a shared machine a "
        "rough number).",
        "",
    ]
    for env in dict.fromkeys(c["env"] for c in cells):
        env_cells = [c for c in cells if c["env"] == env]
        kind = str(env_cells[0]["kind"])
        md += [f"### {env}", "", f"Score: {SCORE_LABELS.get(kind, 'score')}.", ""]
        points = list(dict.fromkeys((c["algorithm"], c["steps"], c["lr"]) for c in env_cells))
        panels = []
        sections: list[str] = []
        for algo, steps, lr in points:
            point = (algo, steps, lr)
            here = sorted(
                (c for c in env_cells if (c["algorithm"], c["steps"], c["lr"]) == point),
                key=lambda c: rank.get(c["method"], len(rank)),
            )
            at = [
                r
                for r in rows
                if r["env"] == env and (r["algorithm"], r["steps"], r["lr"]) == point
            ]
            where = f"{steps} steps per rollout x lr {lr:g}" if steps else f"lr {lr:g}"
            name = f"{algo.upper()}, {where}"  # a grid without the steps axis has steps 0
            vs_ref = {r["method"]: r for r in at if r["table"] == "reference"}
            panels.append((name, [vs_ref[c["method"]] for c in here if c["method"] in vs_ref]))
            sections += _leaderboard(name, here, vs_ref, reference)
            sections += _erc_against(here, [r for r in at if r["table"] == "erc"], rank)
        if plots:
            fig_dir = experiment_dir / "figures"
            fig_dir.mkdir(exist_ok=True)
            png = plot_leaderboard(
                panels,
                reference,
                SCORE_LABELS.get(kind, "score"),
                f"{spec.get('name', experiment_dir.name)} / {env}: the methods against {reference}",
                fig_dir / f"{env}_leaderboard",
            )[0]
            md += [f"![{env} leaderboard]({png.relative_to(experiment_dir).as_posix()})", ""]
        md += sections
    return md


def _leaderboard(
    name: str, cells: list[dict[str, Any]], vs_ref: dict[str, dict[str, Any]], reference: str
) -> list[str]:
    gains = [m for m, r in vs_ref.items() if "score" in r["significant"] and r["d_score"] > 0]
    losses = [m for m, r in vs_ref.items() if "score" in r["significant"] and r["d_score"] < 0]
    ref_cell = next((c for c in cells if c["method"] == reference), None)
    md = [
        f"#### {name}",
        "",
        f"Final score significantly above `{reference}` (q < 0.05): "
        + (", ".join(f"`{m}`" for m in gains) or "none")
        + "; below: "
        + (", ".join(f"`{m}`" for m in losses) or "none")
        + ".",
        "",
        f"| method | n | final score mean (per seed) | Δ vs {reference} [95% CI] | p / p exact / q "
        "| unstable | entropy trend | entropy jitter | acted on | cost / update |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        r = vs_ref.get(c["method"])
        scores = ", ".join(_fmt(v) for v in c["scores"])
        unstable = _share([p["unstable"] for p in c["per_run"]])
        label = f"`{c['method']}`" + (" (P)" if r is not None and r["primary"] else "")
        cost = "1x" if c is ref_cell else (_cost(r["cost"]) if r is not None else "–")
        diff = "" if r is None else _ci(r, "score") + ("" if r["paired"] else " (unpaired)")
        md.append(
            f"| {label} | {c['n']} | {_f(finite_mean(c['scores']))} ({scores}) | {diff} | "
            f"{'' if r is None else _p(r, 'score')} | {unstable} | {_f(c['trend'])} | "
            f"{_f(c['jitter'])} | {c['acted_on_metric']} {_f(c['acted_on'])} | {cost} |"
        )
    return [*md, ""]


def _erc_against(
    cells: list[dict[str, Any]], rows: list[dict[str, Any]], rank: dict[str, int]
) -> list[str]:
    if not rows:
        return []
    acted = {c["method"]: c["acted_on"] for c in cells}
    md = [
        "ERC against each other method (ERC minus the other, paired by seed):",
        "",
        "| ERC | against | n pairs | Δ final score [CI] | p / p exact / q | Δ unstable share [CI] "
        "| Δ jitter [CI] | Δ trend [CI] | acted on: ERC / other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["method"], rank.get(r["against"], len(rank)))):
        label = f"`{r['against']}`" + (" (P)" if r["primary"] else "")
        md.append(
            f"| `{r['method']}` | {label} | {r['n_pairs']} | {_ci(r, 'score')} | {_p(r, 'score')} "
            f"| {_ci(r, 'unstable')} | {_ci(r, 'jitter')} | {_ci(r, 'trend')} | "
            f"{_f(acted[r['method']])} / {_f(acted[r['against']])} |"
        )
    return [*md, ""]
