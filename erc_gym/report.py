"""Markdown (and HTML) report of an experiment folder: the final-score table and the figures.

``write_report(runs/<experiment>)`` writes ``report.md`` and ``report.html`` next to the runs,
with one table per environment -- final score IQM and 95% bootstrap CI over seeds, the per-seed
scores, and the entropy diagnostics of :mod:`erc_gym.diagnostics` -- followed by the figures of
:mod:`erc_gym.plots` (generated if missing).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from erc_gym.analysis import SCORE_LABELS, grid_order, load_runs, stale_runs, summarize

__all__ = ["COLUMNS", "markdown_table", "write_report"]

#: (summary key, column title) of the report tables.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("variant", "variant"),
    ("runs", "runs done"),
    ("score_start", "first score (mean)"),
    ("iqm_ci", "final score IQM [95% CI]"),
    ("per_seed", "per seed"),
    ("score_mean", "mean score over training"),
    ("entropy_final", "final entropy"),
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
            out.append(text)
        else:
            out.append(_fmt(row[key]))
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`erc_gym.analysis.summarize` rows."""
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write_report(experiment_dir: str | Path, *, plots: bool = True) -> Path:
    """Write ``report.md`` and ``report.html`` for an experiment folder; returns the .md path."""
    from erc_gym.plots import plot_experiment

    experiment_dir = Path(experiment_dir)
    runs = load_runs(experiment_dir)
    if not runs:
        raise FileNotFoundError(f"no runs (config.json) below {experiment_dir}")
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
        "95% percentile-bootstrap CI over seeds (with 3 seeds the IQM is the mean and the CI is "
        "wide). Mean score over training: the average of all logged scores (an area under the "
        "learning curve; higher = learnt sooner). Entropy volatility: std of the per-update "
        "change of log mean entropy. Grad-norm spikes: updates above 3x the running median. "
        "Clip fractions, TV on un-sampled actions and the mean old entropy of ERC-clipped / kept "
        "states (tokens): means over training. "
        "`–`: not logged for this run type.",
        "",
    ]
    page = [f"<h1>Experiment <code>{html.escape(name)}</code></h1>"]
    if spec.get("description"):
        page.append(f"<p>{html.escape(spec['description'])}</p>")
    notes = []
    unfinished = sum(not r.done for r in runs)
    if unfinished:
        notes.append(
            f"{unfinished} of {len(runs)} runs are unfinished and left out of every column "
            "(see 'runs done'); `erc-gym experiment` resumes them."
        )
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
    for env, env_rows in envs.items():
        kind = env_rows[0]["kind"]
        md += [f"## {env}", "", f"Score: {SCORE_LABELS.get(kind, 'score')}.", ""]
        md += [markdown_table(env_rows), ""]
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
    if spec.get("axes"):
        from erc_gym.stress import stress_markdown

        baseline = spec.get("baseline")
        md += stress_markdown(
            experiment_dir,
            plots=plots,
            baseline=None if baseline is None else experiment_dir.parent / baseline,
        )
    out = experiment_dir / "report.md"
    _write_atomic(out, "\n".join(md))
    _write_atomic(
        experiment_dir / "report.html",
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        + html.escape(name)
        + "</title></head><body>"
        + "\n".join(page)
        + "</body></html>\n",
    )
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Write-then-rename, so two processes reporting at once never leave a mixed file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
