"""Figures of an experiment: learning and entropy curves with bootstrap bands, entropy-ratio maps.

For each environment of an experiment (variants sharing an env label):

* ``<env>_curves.png`` / ``.svg`` -- score, mean entropy, ERC clip fraction, PPO clip fraction,
  gradient norm and (where known) the drift on un-sampled actions against training steps; one
  line per variant, the mean over seeds with its 95% bootstrap band;
* ``<env>_entropy_ratio.png`` / ``.svg`` -- one heat map per variant: the share of states whose
  entropy ratio ``H_new / H_old`` fell in each bin (rows) at each update (columns), pooled over
  seeds. Ratios outside [0.8, 1.2] are counted in the edge bins.

Uses matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erc_gym.analysis import SCORE_LABELS, STEP_LABELS, Run, load_runs, mean_curve
from erc_gym.diagnostics import RATIO_EDGES

__all__ = ["PANELS", "plot_curves", "plot_experiment", "plot_ratio_heatmaps"]

#: (series, y-axis label) of the curve panels, in order; the score label depends on the kind.
PANELS: tuple[tuple[str, str], ...] = (
    ("score", ""),
    ("entropy", "mean policy entropy (nats)"),
    ("erc_clip_fraction", "ERC clip fraction (share of states / tokens)"),
    ("clip_fraction", "PPO clip fraction (share of samples / tokens)"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("tv_unsampled", "TV on un-sampled actions"),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_env(runs: Sequence[Run]) -> dict[str, dict[str, list[Run]]]:
    out: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        out.setdefault(run.env_label, {}).setdefault(run.variant, []).append(run)
    return out


def _save(fig: Any, path: Path) -> list[Path]:
    paths = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def plot_curves(variants: dict[str, list[Run]], title: str, path: Path) -> list[Path]:
    """The curve panels of one environment; returns the written PNG and SVG paths."""
    plt = _pyplot()
    kind = next(iter(variants.values()))[0].kind
    panels = [
        (name, label)
        for name, label in PANELS
        if any(r.series(name)[0].size for group in variants.values() for r in group)
    ]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, label) in zip(axes.flat, panels, strict=False):
        for i, (variant, group) in enumerate(variants.items()):
            x, mean, lo, hi = mean_curve([r.series(name) for r in group])
            if not x.size:
                continue
            color = colors[i % len(colors)]
            ax.plot(x, mean, color=color, label=f"{variant} (n={len(group)})", lw=1.6)
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        ax.set_xlabel(STEP_LABELS.get(kind, "step"))
        ax.set_ylabel(label or SCORE_LABELS.get(kind, "score"))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.suptitle(f"{title}: mean over seeds, shaded 95% bootstrap band")
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 4), 1, 0.96))
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_ratio_heatmaps(variants: dict[str, list[Run]], title: str, path: Path) -> list[Path]:
    """Entropy-ratio heat maps of one environment (one panel per variant)."""
    plt = _pyplot()
    names = [v for v, g in variants.items() if any(r.histograms()[0].size for r in g)]
    if not names:
        return []
    kind = variants[names[0]][0].kind
    cols = min(len(names), 3)
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.4 * cols, 3.8 * rows), squeeze=False, layout="constrained"
    )
    from matplotlib.colors import PowerNorm

    image = None
    for ax, name in zip(axes.flat, names, strict=False):
        hists = [r.histograms() for r in variants[name]]
        n = min(h.shape[0] for _, h in hists if h.size)
        steps = next(x for x, h in hists if h.size)[:n]
        counts = np.sum([h[:n] for _, h in hists if h.size], axis=0)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        image = ax.imshow(
            share.T,
            origin="lower",
            aspect="auto",
            extent=(0, n, RATIO_EDGES[0], RATIO_EDGES[-1]),
            cmap="viridis",
            # a square-root-like scale, so the tails outside the band stay visible
            norm=PowerNorm(gamma=0.4, vmin=0.0, vmax=max(float(share.max()), 1e-9)),
            interpolation="nearest",
        )
        ticks = np.linspace(0, n - 1, min(n, 4)).round().astype(int)
        ax.set_xticks(ticks + 0.5)
        ax.set_xticklabels([f"{int(steps[t]):,}" for t in ticks])
        ax.set_xlabel(STEP_LABELS.get(kind, "step"))
        ax.set_ylabel("entropy ratio H_new / H_old")
        ax.set_title(name, fontsize=10)
        band = variants[name][0].config.get("erc")
        if band:
            for edge in band:
                ax.axhline(edge, color="white", lw=0.8, ls="--")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(
            image, ax=axes.ravel().tolist(), label="share of states in the bin (0.01 wide)"
        )
    fig.suptitle(f"{title}: entropy-ratio distribution per update (dashed: ERC band)")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_experiment(experiment_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """All figures of an experiment folder (default output: ``<experiment_dir>/figures``)."""
    experiment_dir = Path(experiment_dir)
    runs = load_runs(experiment_dir)
    if not runs:
        raise FileNotFoundError(f"no runs (config.json) below {experiment_dir}")
    out = Path(out_dir) if out_dir is not None else experiment_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for env, variants in _by_env(runs).items():
        title = f"{experiment_dir.name} / {env}"
        paths += plot_curves(variants, title, out / f"{env}_curves")
        paths += plot_ratio_heatmaps(variants, title, out / f"{env}_entropy_ratio")
    return paths
