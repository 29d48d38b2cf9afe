"""Reading a runs folder: per-run series and the per-variant summary of final scores.

A runs folder is what :mod:`erc_gym.lab.runner` writes: ``<experiment>/<variant>/<seed>/`` with
``config.json`` and ``metrics.jsonl``. Each kind of run logs under its own key names (SB3's
``train/*``, the bandit's and the LLM trainer's own); its kind's ``series_keys``
(:data:`SERIES_KEYS`) map them onto common names so that plots and reports treat them alike.

Final scores are summarised as rliable does (:mod:`erc_gym.lab.stats`): the interquartile mean
(IQM, the mean of the middle 50% of runs) with a 95% percentile-bootstrap confidence interval
over runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from erc_gym.diagnostics import entropy_jitter, entropy_trend, entropy_volatility, grad_norm_spikes
from erc_gym.jsonl import read_jsonl
from erc_gym.lab.grid import expand
from erc_gym.lab.kinds import get_kind, kind_names
from erc_gym.lab.rundir import done_problem, read_done
from erc_gym.lab.stats import bootstrap_ci, finite_mean, iqm

__all__ = [
    "SCORE_LABELS",
    "SERIES_KEYS",
    "STEP_LABELS",
    "Run",
    "experiment_above",
    "find_experiments",
    "grid_order",
    "load_runs",
    "stale_runs",
    "summarize",
    "unreadable_runs",
]


class _ByKind(Mapping[str, Any]):
    """``kind name -> getattr(kind, attr)`` over the registered kinds (:mod:`erc_gym.lab.kinds`)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __getitem__(self, kind: str) -> Any:
        try:
            return getattr(get_kind(kind), self.attr)
        except ValueError:
            raise KeyError(kind) from None

    def __iter__(self) -> Iterator[str]:
        return iter(kind_names())

    def __len__(self) -> int:
        return len(kind_names())


#: Common series name -> the key in ``metrics.jsonl``, per kind of run (each kind's
#: ``series_keys``).
SERIES_KEYS: Mapping[str, Mapping[str, str]] = _ByKind("series_keys")
#: y-axis label of the score per kind.
SCORE_LABELS: Mapping[str, str] = _ByKind("score_label")
#: x-axis label per kind.
STEP_LABELS: Mapping[str, str] = _ByKind("step_label")


@dataclass
class Run:
    """One run folder: its ``config.json`` and ``metrics.jsonl`` lines.

    ``done``: finished, with the metrics it finished with; ``damaged``: why a run with a
    ``done`` marker does not count (:func:`erc_gym.lab.rundir.done_problem`: its log was cut
    short or edited since), None otherwise; ``skipped_lines``: numbers of the log's lines that
    could not be read (left out of every series).
    """

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    done: bool
    damaged: str | None = None
    skipped_lines: list[int] = field(default_factory=list)

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
        kind = get_kind(self.kind)
        keys = kind.series_keys
        key, step_key = keys.get(name), keys["step"]
        if key is None:
            return np.empty(0), np.empty(0)
        fallback = getattr(kind, "series_fallbacks", {}).get(name)
        if fallback is not None and not any(key in row for row in self.rows):
            key = fallback  # an older log, written before the kind's key existed
        xs, ys = [], []
        for row in self.rows:
            value, step = row.get(key), row.get(step_key)
            if _number(value) and _number(step):  # a damaged line's strings or lists: left out
                xs.append(float(step))
                ys.append(float(value))
        return np.asarray(xs), np.asarray(ys)

    def histograms(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, counts (updates x bins))`` of the entropy-ratio histograms."""
        keys = get_kind(self.kind).series_keys
        key, step_key = keys.get("ratio_hist"), keys["step"]
        xs, hs = [], []
        for row in self.rows:
            value, step = (row.get(key), row.get(step_key)) if key else (None, None)
            if isinstance(value, list) and value and all(map(_number, value)) and _number(step):
                xs.append(float(step))
                hs.append(value)
        if hs:  # the run's bin count; a damaged line with another one is left out
            bins = max({len(h) for h in hs}, key=[len(h) for h in hs].count)
            xs = [x for x, h in zip(xs, hs, strict=True) if len(h) == bins]
            hs = [h for h in hs if len(h) == bins]
        return np.asarray(xs), np.asarray(hs, dtype=np.float64)

    def train_seconds(self) -> float:
        """The training time its ``done`` marker records (the runner's clock around the
        trainer, the last session only when the run was resumed); NaN when unfinished."""
        try:
            marker = read_done(self.path)
        except (OSError, ValueError):
            return math.nan
        return math.nan if marker is None else marker.seconds

    def final_score(self) -> float:
        """The last logged score (NaN when none). For an LLM run that is the mean accuracy of its
        last ``score_evals`` evaluations (``eval_score``)."""
        _, ys = self.series("score")
        return float(ys[-1]) if ys.size else math.nan


def _number(value: Any) -> TypeGuard[float]:
    """A finite int or float (not a bool): what a series may hold."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_grid_run(config: Any) -> bool:
    """A run folder written by :mod:`erc_gym.lab.runner` (not a lone ``erc-gym llm`` run): its
    config names a variant and a known kind."""
    return (
        isinstance(config, dict)
        and isinstance(config.get("variant"), str)
        and config.get("kind") in kind_names()
    )


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def grid_order(experiment_dir: str | Path) -> list[tuple[str, int]] | None:
    """``(variant, seed)`` of the grid the folder's ``experiment.json`` declares, in grid order
    (env, algorithm, band, seed); None without an ``experiment.json``."""
    spec = _read_config(Path(experiment_dir) / "experiment.json")
    if spec is None:
        return None
    try:
        return [(r.variant, r.seed) for r in expand(spec)]
    except (KeyError, TypeError, ValueError):
        return None


def load_runs(experiment_dir: str | Path, *, grid_only: bool = True) -> list[Run]:
    """The ``<variant>/<seed>`` run folders below an experiment folder.

    With an ``experiment.json`` (written by the runner) and ``grid_only``, only the runs of the
    grid it declares are returned, in grid order (env, algorithm, band, seed): folders of variants
    or seeds removed from the config are left out (:func:`stale_runs` lists them). Otherwise every
    run folder, sorted by path. Folders that are not runs of a grid are skipped.
    """
    root = Path(experiment_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no experiment folder {root}")
    runs = []
    for cfg in sorted(root.glob("*/*/config.json")):
        config = _read_config(cfg)
        if not _is_grid_run(config):
            continue
        assert config is not None
        folder = cfg.parent
        skipped: list[int] = []
        rows = read_jsonl(folder / "metrics.jsonl", skipped)
        damaged = done_problem(folder)
        runs.append(
            Run(
                path=folder,
                config=config,
                rows=rows,
                done=(folder / "done").exists() and damaged is None,
                damaged=damaged,
                skipped_lines=skipped,
            )
        )
    order = grid_order(root) if grid_only else None
    if order is None:
        return runs
    rank = {key: i for i, key in enumerate(order)}
    return sorted(
        (r for r in runs if (r.variant, r.seed) in rank), key=lambda r: rank[(r.variant, r.seed)]
    )


#: Files of a run folder (:mod:`erc_gym.lab.rundir`): a folder with any of them is a run.
_RUN_FILES = ("config.json", "run.json", "metrics.jsonl", "done")


def unreadable_runs(experiment_dir: str | Path) -> list[tuple[Path, str]]:
    """``(folder, why)`` for each ``<variant>/<seed>`` folder of run files that
    :func:`load_runs` cannot read as a run of a grid (it leaves them out): its ``config.json``
    is missing, not JSON, or does not say which variant and kind the run belongs to."""
    out = []
    for folder in sorted(Path(experiment_dir).glob("*/*/")):
        if not any((folder / name).exists() for name in _RUN_FILES):
            continue
        path = folder / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            out.append((folder, "it has no config.json"))
            continue
        except (OSError, ValueError) as err:
            reason = getattr(err, "strerror", None) or " ".join(str(err).split())
            out.append((folder, f"its config.json cannot be read ({reason})"))
            continue
        if not _is_grid_run(config):
            out.append((folder, "its config.json names no variant and known kind"))
    return out


def stale_runs(experiment_dir: str | Path) -> list[Path]:
    """Run folders that the experiment's current config (``experiment.json``) no longer declares."""
    kept = {r.path for r in load_runs(experiment_dir)}
    return [r.path for r in load_runs(experiment_dir, grid_only=False) if r.path not in kept]


def find_experiments(path: str | Path) -> tuple[list[Path], list[str]]:
    """Experiment folders at or below ``path`` (``path`` itself or its sub-folders).

    An experiment folder has an ``experiment.json`` or ``<variant>/<seed>/config.json`` runs of a
    grid. Returns the folders and notes about folders skipped: lone training runs such as those of
    ``erc-gym llm`` (a ``config.json`` and ``metrics.jsonl`` but no grid).
    """
    path = Path(path)
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file; give an experiment folder or a runs folder")
    if not path.is_dir():
        raise FileNotFoundError(f"no folder {path}")

    def is_experiment(p: Path) -> bool:
        return (p / "experiment.json").exists() or any(
            _is_grid_run(_read_config(c)) for c in p.glob("*/*/config.json")
        )

    def lone_runs(p: Path) -> list[Path]:
        return [
            c.parent
            for pattern in ("config.json", "*/config.json")
            for c in sorted(p.glob(pattern))
            if (c.parent / "metrics.jsonl").exists() and not _is_grid_run(_read_config(c))
        ]

    if is_experiment(path):
        return [path], []
    found: list[Path] = []
    notes: list[str] = []
    lone = lone_runs(path)
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        if is_experiment(child):
            found.append(child)
        elif child not in lone:
            lone += [p for p in lone_runs(child) if p not in lone]
    notes += [
        f"skipped {p}: a single training run (e.g. from erc-gym llm), not an experiment grid; "
        f"its log is {p / 'metrics.jsonl'}"
        for p in lone
    ]
    return found, notes


def experiment_above(path: str | Path) -> Path | None:
    """The experiment folder that holds ``path`` when ``path`` is one of its run folders
    (``<experiment>/<variant>/<seed>``) or variant folders; None otherwise."""
    path = Path(path)
    if _is_grid_run(_read_config(path / "config.json")):
        return path.parent.parent
    if any(_is_grid_run(_read_config(c)) for c in path.glob("*/config.json")):
        return path.parent
    return None


def _positive(metric: Any, entropies: np.ndarray) -> float:
    """``metric(entropies)``, NaN where some entropy is not positive (no log change)."""
    return metric(entropies) if bool(np.all(entropies[np.isfinite(entropies)] > 0)) else math.nan


def summarize(runs: Sequence[Run], spike_k: float = 3.0) -> list[dict[str, Any]]:
    """One row per variant (in first-seen order) with the final-score IQM, CI and diagnostics.

    Keys: ``variant``, ``env``, ``runs`` (finished / total), ``iqm``, ``ci_low``, ``ci_high``,
    ``mean``, ``per_seed`` (final scores), ``score_start`` (mean first logged score: the warm
    start / initial policy where it is evaluated before training), ``score_mean`` (mean of each
    run's logged scores -- an area under the learning curve -- averaged over runs),
    ``entropy_final``, ``entropy_trend`` and ``entropy_jitter`` (the steady part and the noise of
    log mean entropy, :mod:`erc_gym.diagnostics`), ``entropy_volatility`` (which mixes both),
    ``grad_norm_spikes`` (mean per run), ``erc_clip_fraction``, ``clip_fraction`` and
    ``tv_unsampled``, ``entropy_old_clipped`` and ``entropy_old_kept`` (mean old entropy of the
    states / tokens ERC clipped and kept; the SB3 callback's split uses its band even with ERC off)
    -- means over the run, then over runs.

    Only finished runs (a ``done`` marker, with the metrics they finished with) enter the scores
    and diagnostics: an unfinished run's last score is a partial one. ``runs`` says how many of
    the variant's runs that is; ``unfinished`` and ``damaged`` (marked done, but the log changed
    since: :attr:`Run.damaged`) list the seeds left out.
    """
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    rows = []
    for variant, every in by_variant.items():
        group = [r for r in every if r.done]
        finals = [r.final_score() for r in group]
        lo, hi = bootstrap_ci(finals)
        entropies = [r.series("entropy")[1] for r in group]
        rows.append(
            {
                "variant": variant,
                "env": every[0].env_label,
                "kind": every[0].kind,
                "runs": f"{len(group)}/{len(every)}",
                "unfinished": [r.seed for r in every if not r.done and r.damaged is None],
                "damaged": [r.seed for r in every if r.damaged is not None],
                "iqm": iqm(finals),
                "ci_low": lo,
                "ci_high": hi,
                "mean": finite_mean(finals),
                "per_seed": finals,
                "score_start": finite_mean(
                    [ys[0] if ys.size else math.nan for ys in (r.series("score")[1] for r in group)]
                ),
                "score_mean": finite_mean([finite_mean(r.series("score")[1]) for r in group]),
                "entropy_final": finite_mean([e[-1] if e.size else math.nan for e in entropies]),
                "entropy_trend": finite_mean([_positive(entropy_trend, e) for e in entropies]),
                "entropy_jitter": finite_mean([_positive(entropy_jitter, e) for e in entropies]),
                "entropy_volatility": finite_mean(
                    [_positive(entropy_volatility, e) for e in entropies]
                ),
                "grad_norm_spikes": finite_mean(
                    [grad_norm_spikes(r.series("grad_norm")[1], spike_k) for r in group]
                ),
                "erc_clip_fraction": finite_mean(
                    [finite_mean(r.series("erc_clip_fraction")[1]) for r in group]
                ),
                "clip_fraction": finite_mean(
                    [finite_mean(r.series("clip_fraction")[1]) for r in group]
                ),
                "tv_unsampled": finite_mean(
                    [finite_mean(r.series("tv_unsampled")[1]) for r in group]
                ),
                "entropy_old_clipped": finite_mean(
                    [finite_mean(r.series("entropy_old_clipped")[1]) for r in group]
                ),
                "entropy_old_kept": finite_mean(
                    [finite_mean(r.series("entropy_old_kept")[1]) for r in group]
                ),
            }
        )
    return rows
