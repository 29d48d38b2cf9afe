"""Figures of an experiment: learning and entropy curves with bootstrap bands, entropy-ratio maps.

For each environment of an experiment (variants sharing an env label):

* ``<env>_curves.png`` / ``.svg`` -- score, mean entropy, ERC clip fraction, PPO clip fraction,
  gradient norm and (where known) the drift on un-sampled actions against training steps; one
  line per variant, the mean over seeds with its 95% bootstrap band;
* ``<env>_entropy_ratio.png`` / ``.svg`` -- one heat map per variant: the share of states whose
  entropy ratio ``H_new / H_old`` fell in each bin (rows) at each update (columns), pooled over
  seeds. Ratios outside [0.8, 1.2] are counted in the edge bins;

and for a stress experiment (:mod:`erc_gym.lab.stress`) ``<env>_stress_map.png`` / ``.svg``
(:func:`plot_stress_map`); for a comparison of methods, ``<env>_leaderboard.png`` / ``.svg``
(:func:`plot_leaderboard`).

A new figure is a function here that draws with :func:`pyplot` and writes with
:func:`save_figure`. Uses matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erc_gym.atomic import atomic_write
from erc_gym.diagnostics import RATIO_EDGES
from erc_gym.lab.analysis import SCORE_LABELS, STEP_LABELS, Run, load_runs
from erc_gym.lab.clipping import ClipProfile
from erc_gym.lab.stats import finite, mean_curve
from erc_gym.lab.stress import (
    COLLAPSE_FACTOR,
    EXPLOSION_FACTOR,
    SCORE_DROP_SHARE,
    effect_table,
)
from erc_gym.losses import RECIPES

__all__ = [
    "ALGORITHM_STYLES",
    "PANELS",
    "plot_curves",
    "plot_experiment",
    "plot_leaderboard",
    "plot_ratio_heatmaps",
    "plot_rollout_drift",
    "plot_stress_map",
    "plot_who_gets_clipped",
    "pyplot",
    "save_figure",
    "smooth",
    "variant_style",
]

#: (series, y-axis label) of the curve panels, in order; the score label depends on the kind.
PANELS: tuple[tuple[str, str], ...] = (
    ("score", ""),
    ("entropy", "mean policy entropy (nats)"),
    ("erc_clip_fraction", "ERC clip fraction (share of states / tokens)"),
    ("clip_fraction", "PPO clip fraction (share of samples / tokens)"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("tv_unsampled", "TV on un-sampled actions"),
)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_env(runs: Sequence[Run]) -> dict[str, dict[str, list[Run]]]:
    """Runs by env label, then variant, in the order given (:func:`load_runs` keeps grid order).

    A variant with finished runs is drawn from those only (an unfinished run would cut every
    mean curve at its last step); one with none finished is drawn from its partial runs.
    """
    out: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        out.setdefault(run.env_label, {}).setdefault(run.variant, []).append(run)
    for variants in out.values():
        for variant, group in variants.items():
            variants[variant] = [r for r in group if r.done] or group
    return out


def save_figure(fig: Any, path: Path) -> list[Path]:
    """Save ``fig`` as ``path``.png and .svg; returns both paths.

    Each is written with :func:`erc_gym.atomic.atomic_write`, so a reader (or a second report of
    the same folder) never sees a half-written figure and a failed save leaves the previous
    figure in place.
    """
    paths = [path.with_suffix(".png"), path.with_suffix(".svg")]
    for out, extra in ((paths[0], {"dpi": 110}), (paths[1], {})):

        def write(tmp: Path, out: Path = out, extra: dict[str, Any] = extra) -> None:
            fig.savefig(tmp, bbox_inches="tight", format=out.suffix[1:], **extra)

        atomic_write(out, write, fsync=False)
    return paths


#: Line styles and markers given to the recipes of :data:`erc_gym.losses.RECIPES`, in order.
_LINE_STYLES: tuple[dict[str, Any], ...] = (
    {"ls": "-", "marker": None},
    {"ls": "--", "marker": "o", "mfc": "none"},
    {"ls": ":", "marker": "^", "mfc": "none"},
    {"ls": "-.", "marker": "s", "mfc": "none"},
    {"ls": "--", "marker": "x"},
)
#: Line style and marker per algorithm: same-band variants share a colour, so curves that
#: coincide (PPO and DAPO often do) stay visible as a solid line carrying markers.
ALGORITHM_STYLES: dict[str, dict[str, Any]] = dict(
    zip(RECIPES, itertools.cycle(_LINE_STYLES), strict=False)
)
_LINE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}


def _style_legend(algorithms: set[str]) -> str:
    """``solid PPO, dashed+o DAPO, ...``: what the line of each of ``algorithms`` looks like."""
    return ", ".join(
        _LINE_NAMES[st["ls"]] + (f"+{st['marker']}" if st["marker"] else "") + f" {name.upper()}"
        for name, st in ALGORITHM_STYLES.items()
        if name in algorithms
    )


#: Series with more points than this are shown as a trailing moving average (LLM runs log every
#: step; their raw curves are mostly noise).
SMOOTH_ABOVE = 100


def smooth(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Trailing moving average over ``len(y) // 15`` points when ``len(y) > SMOOTH_ABOVE``.

    Returns ``(x, y, window)``; ``window == 1`` means unchanged.
    """
    if y.size <= SMOOTH_ABOVE:
        return x, y, 1
    k = max(3, y.size // 15)
    avg = np.convolve(y, np.ones(k) / k, mode="valid")
    return x[k - 1 :], avg, k


def variant_style(run: Run, bands: list[Any]) -> dict[str, Any]:
    """Colour by ERC band (its index in ``bands``), line style and marker by algorithm."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    band = run.config.get("erc")
    band = tuple(band) if band else None
    style = dict(ALGORITHM_STYLES.get(str(run.config.get("algorithm")), {"ls": "-"}))
    style["color"] = colors[bands.index(band) % len(colors)] if band in bands else colors[0]
    return style


def _robust_ylim(ax: Any, highs: list[np.ndarray]) -> None:
    """Clip the y-axis at the 99th percentile of the upper bands (single spikes off-scale)."""
    values = np.concatenate([h[np.isfinite(h)] for h in highs]) if highs else np.empty(0)
    if values.size < 20:
        return
    top = float(np.quantile(values, 0.99))
    low, high = ax.get_ylim()
    if 0 < top < high:
        ax.set_ylim(low, top * 1.1 if top > 0 else high)


def plot_curves(variants: dict[str, list[Run]], title: str, path: Path) -> list[Path]:
    """The curve panels of one environment; returns the written PNG and SVG paths.

    Colour = ERC band, line style and marker = algorithm (:data:`ALGORITHM_STYLES`). Series longer
    than :data:`SMOOTH_ABOVE` points are smoothed per run (:func:`smooth`) before the mean and
    its band are taken; gradient-norm and clip-fraction axes clip rare spikes.
    """
    plt = pyplot()
    kind = next(iter(variants.values()))[0].kind
    panels = [
        (name, label)
        for name, label in PANELS
        if any(r.series(name)[0].size for group in variants.values() for r in group)
    ]
    bands: list[Any] = []
    for group in variants.values():
        band = group[0].config.get("erc")
        band = tuple(band) if band else None
        if band not in bands:
            bands.append(band)
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    windows: set[int] = set()
    for ax, (name, label) in zip(axes.flat, panels, strict=False):
        highs = []
        for variant, group in variants.items():
            curves = []
            for r in group:
                x, y, k = smooth(*r.series(name))
                windows.add(k)
                curves.append((x, y))
            x, mean, lo, hi = mean_curve(curves)
            if not x.size:
                continue
            style = variant_style(group[0], bands)
            marker_every = max(1, x.size // 12)
            ax.plot(
                x,
                mean,
                label=f"{variant} (n={len(group)})",
                lw=1.6,
                ms=4.5,
                markevery=marker_every,
                **style,
            )
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, lw=0)
            highs.append(hi)
        if name in ("grad_norm", "clip_fraction", "erc_clip_fraction"):
            _robust_ylim(ax, highs)
        ax.set_xlabel(STEP_LABELS.get(kind, "step"))
        ax.set_ylabel(label or SCORE_LABELS.get(kind, "score"))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    smoothed = max(windows, default=1)
    note = f"; noisy series: moving average over {smoothed} points" if smoothed > 1 else ""
    algorithms = {str(g[0].config.get("algorithm")) for g in variants.values()}
    styles = _style_legend(algorithms)
    fig.suptitle(
        f"{title}: mean over seeds, shaded 95% bootstrap band{note}\n"
        "colour = ERC band" + (f", line style = algorithm ({styles})" if styles else ""),
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.06 + 0.025 * (len(labels) // 4), 1, 0.95))
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_ratio_heatmaps(variants: dict[str, list[Run]], title: str, path: Path) -> list[Path]:
    """Entropy-ratio heat maps of one environment (one panel per variant)."""
    plt = pyplot()
    names = [v for v, g in variants.items() if any(r.histograms()[0].size for r in g)]
    if not names:
        return []
    kind = variants[names[0]][0].kind
    # one row per algorithm when the grid is algorithm x band (names arrive in grid order)
    bands = list(dict.fromkeys(str(variants[n][0].config.get("erc")) for n in names))
    cols = len(bands) if 2 <= len(bands) <= 5 and len(names) % len(bands) == 0 else 3
    cols = min(len(names), cols)
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, layout="constrained"
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
    out = save_figure(fig, path)
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


# ---------------------------------------------------------------- who gets clipped


def plot_who_gets_clipped(
    profiles: Sequence[tuple[str, ClipProfile]], title: str, path: Path
) -> list[Path]:
    """Who ERC clips, from the runs' ``clipping.jsonl`` (:mod:`erc_gym.lab.clipping`).

    ``profiles``: ``(label, profile)`` per line (a variant, its seeds added up). A variant with
    ERC off is drawn dashed: its "outside" is what ERC(0.95, 1.05) would have clipped. Eight
    panels: (a) the clip probability per old-entropy decile of the tokens with ``A != 0``; (b)
    the same for all tokens (dotted) and the share of ``A == 0`` tokens per decile (solid), the
    confound of a comparison of means; (c) per ``|A|`` decile; (d) per response position
    (language models); (e) the cumulative distribution of the old entropy of clipped and kept
    tokens with ``A != 0`` (the random token samples); (f) the per-state entropy ratio against
    ``KL(old || new)`` after each update with the band, arg-max changes marked; (g) the share
    outside the band at each optimiser step of a rollout (the within-rollout drift); (h) counts.
    Returns ``[]`` when no profile has data.
    """
    profiles = [(label, p) for label, p in profiles if p is not None and p.updates]
    if not profiles:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.4), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {
        label: {"color": colors[i % len(colors)], "ls": "-" if p.erc else "--"}
        for i, (label, p) in enumerate(profiles)
    }

    def deciles(ax: Any, key: str, labelled: bool) -> None:
        """One line per profile: P(clipped) over the deciles of ``key``."""
        for label, p in profiles:
            if p.has_tokens:
                rate = p.rate(key)
                x = np.arange(1, rate.size + 1)
                ax.plot(
                    x, rate, marker="o", ms=3, label=label if labelled else None, **style[label]
                )

    ax = axes[0, 0]
    deciles(ax, "h_old_adv_bins", labelled=True)
    ax.set_xlabel("old-entropy decile of the update's A != 0 tokens (1 = lowest)")
    ax.set_ylabel("P(clipped | A != 0)")
    ax.set_title("(a) clip probability by old-entropy decile of the A != 0 tokens", fontsize=10)
    ax = axes[0, 1]
    for label, p in profiles:
        if p.has_tokens:
            b = p.bins["h_old_bins"]
            x = np.arange(1, b["n"].size + 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                zero = np.where(b["n"] > 0, 1 - b["n_adv"] / np.maximum(b["n"], 1), np.nan)
            ax.plot(x, zero, marker=".", color=style[label]["color"], ls="-")
            ax.plot(x, p.rate("h_old_bins"), color=style[label]["color"], ls=":")
    ax.set_xlabel("old-entropy decile of the update (1 = lowest)")
    ax.set_ylabel("share")
    ax.set_title("(b) share with A = 0 (solid), P(clipped) all tokens (dotted)", fontsize=10)
    ax = axes[0, 2]
    deciles(ax, "abs_adv_bins", labelled=False)
    ax.set_xlabel("|A| decile of the update's tokens with A != 0 (1 = smallest)")
    ax.set_ylabel("P(clipped | A != 0)")
    ax.set_title("(c) clip probability by |A| decile", fontsize=10)
    ax = axes[0, 3]
    drawn = False
    for label, p in profiles:
        rate = p.rate("position_bins")
        if rate.size:
            n = p.bins["position_bins"]["n"]
            last = int(np.nonzero(n)[0].max()) + 1 if n.any() else 0
            ax.plot(np.arange(last), rate[:last], marker="o", ms=3, **style[label])
            drawn = True
    ax.set_xlabel("response position (token)")
    ax.set_ylabel("P(clipped | A != 0)")
    ax.set_title("(d) clip probability by response position", fontsize=10)
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "single-step actions:\nno response positions",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="grey",
        )
    ax = axes[1, 0]
    for label, p in profiles:
        s = p.sample
        if "h_old" not in s:
            continue
        nonzero = s["adv"] != 0
        for mask, ls, what in (
            (s["outside"] > 0.5, "-", "clipped"),
            (s["outside"] < 0.5, ":", "kept"),
        ):
            h = np.sort(s["h_old"][mask & nonzero])
            if h.size:
                ax.step(
                    h,
                    np.arange(1, h.size + 1) / h.size,
                    where="post",
                    color=style[label]["color"],
                    ls=ls,
                    label=f"{label}: {what}",
                )
    ax.set_xlabel("old entropy (nats)")
    ax.set_ylabel("cumulative share")
    ax.set_title("(e) old entropy, clipped (solid) vs kept (dotted), A != 0", fontsize=10)
    ax = axes[1, 1]
    band = profiles[0][1].band
    for label, p in profiles:
        s = p.state_sample
        if "kl" not in s:
            continue
        kl = np.maximum(s["kl"], 1e-12)
        changed = s["argmax_changed"] > 0.5
        ax.scatter(kl[~changed], s["rho"][~changed], s=5, alpha=0.4, color=style[label]["color"])
        ax.scatter(kl[changed], s["rho"][changed], s=18, marker="x", color="black")
    for edge in band:
        ax.axhline(edge, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("KL(old || new) per state after the update")
    ax.set_ylabel("entropy ratio H_new / H_old")
    ax.set_title(
        f"(f) entropy ratio vs KL; band {band[0]:g}-{band[1]:g} dashed, x = arg-max changed",
        fontsize=10,
    )
    _drift_axes(
        axes[1, 2],
        [(p.step_outside(), style[label]) for label, p in profiles],
        "optimiser step within the rollout (0 = on-policy)",
        "share of the step's tokens outside the band",
    )
    axes[1, 2].set_title("(g) within-rollout drift", fontsize=10)
    ax = axes[1, 3]
    ax.axis("off")
    lines = ["states audited after an update:", ""]
    for label, p in profiles:
        st = p.states
        if st.get("states"):
            lines.append(
                f"{label}: arg-max changed in {st.get('argmax_changed', 0):,} of "
                f"{st['states']:,} states; {st.get('argmax_changed_in_band', 0):,} of those "
                "kept a ratio in the band"
            )
    ax.text(
        0,
        1,
        "\n".join(_wrap(line, 60) for line in lines),
        va="top",
        fontsize=8,
        transform=ax.transAxes,
        family="monospace",
    )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if not handles:
        handles = [plt.Line2D([], [], **style[label]) for label, _ in profiles]
        labels = [label for label, _ in profiles]
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=min(len(labels), 4),
        frameon=False,
        fontsize=9,
    )
    fig.suptitle(
        f"{title}: who gets clipped (off-policy steps; dashed = ERC off, the tokens outside "
        "(0.95, 1.05) that ERC would have clipped)",
        fontsize=11,
    )
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def _drift_axes(
    ax: Any, curves: Sequence[tuple[np.ndarray, dict[str, Any]]], xlabel: str, ylabel: str
) -> None:
    """Draw shares outside the band against the optimiser step of a rollout."""
    for share, style in curves:
        if len(share):
            ax.plot(np.arange(len(share)), share, marker="o", ms=3, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def plot_rollout_drift(
    curves: Sequence[tuple[str, Sequence[float], bool]],
    band: tuple[float, float],
    title: str,
    path: Path,
) -> list[Path]:
    """The within-rollout drift: the share of a rollout's states whose entropy ratio is outside
    ``band`` after each optimiser step on it, with and without ERC.

    ``curves``: ``(label, shares, erc)`` -- ``shares[k]`` after the ``k``-th step (``shares[0]``
    before the first, 0 by construction), ``erc`` whether the steps were taken with ERC (solid)
    or without (dashed). From :func:`erc_gym.bandit.rollout_drift` (``outside``) or the study
    ``experiments/studies/erc_epoch_drift.py --figure``.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = list(dict.fromkeys(label.rsplit(",", 1)[0] for label, _, _ in curves))
    styled = [
        (
            np.asarray(shares, dtype=np.float64),
            {
                "color": colors[groups.index(label.rsplit(",", 1)[0]) % len(colors)],
                "ls": "-" if erc else "--",
                "label": label,
            },
        )
        for label, shares, erc in curves
    ]
    _drift_axes(
        ax,
        styled,
        "optimiser steps taken on the rollout",
        f"share of states with entropy ratio outside ({band[0]:g}, {band[1]:g})",
    )
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(
        f"{title}\nsolid: with ERC, dashed: without (same rollout, same start)", fontsize=10
    )
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


# ---------------------------------------------------------------- stress map


def _cell_text(value: float) -> str:
    """A heat-map cell's number: whole numbers from 10 up, two significant digits below."""
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"


#: The stress map's rows per algorithm: (row name, metric in the ERC-off column, metric in each
#: band's column, colour map of the band columns). The ERC-off column shows the absolute value;
#: the band columns show ERC's effect, coloured so that blue is always "better with ERC".
_MAP_ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("score", "iqm", "d_score", "RdBu"),  # higher score = better = blue
    ("jitter", "jitter", "d_jitter", "RdBu_r"),  # less jitter = blue
    ("trend", "trend", "d_trend", "RdBu"),  # a slower fall (or a faster rise) = blue
    ("unstable", "unstable", "unstable", "Reds"),
)


def plot_stress_map(
    cells: Sequence[dict[str, Any]],
    env: str,
    path: str | Path,
    primary: Sequence[dict[str, Any]] | None = None,
) -> list[Path]:
    """One heat-map figure of an environment's stress map; returns the PNG and SVG paths.

    Columns: ERC off, then one per ERC band (fixed or adaptive). For each algorithm four rows of
    panels, each over x = optimiser steps per rollout and y = learning rate:

    * final score: the IQM without ERC, and ERC's effect on it (mean paired difference by seed,
      ERC minus off);
    * entropy jitter and entropy trend (:mod:`erc_gym.diagnostics`): the value without ERC, and
      ERC's effect (mean paired difference);
    * the share of unstable runs (:func:`erc_gym.lab.stress.instability`) in each column.

    In the effect panels blue means higher score, less jitter or a slower fall of the entropy
    with ERC, on one colour scale per metric; a framed cell with a ``*``: the paired difference is
    significant after Holm's adjustment over the map's cells
    (:func:`erc_gym.lab.stress.effect_table`; with ``primary``, the config's declared cells form
    one family across environments).
    """
    plt = pyplot()
    env_cells = [c for c in cells if c["env"] == env]
    effects = [e for e in effect_table(cells, primary) if e["env"] == env]
    algos = list(dict.fromkeys(c["algorithm"] for c in env_cells))
    bands = list(dict.fromkeys(c["band"] for c in env_cells if c["band"] != "off"))
    columns = ["off", *bands]
    steps = sorted({c["steps"] for c in env_cells})
    lrs = sorted({c["lr"] for c in env_cells})
    ns = sorted({c["n"] for c in env_cells})
    # one colour scale per effect metric across algorithms and bands, so colours compare
    lims = {}
    for metric in ("d_score", "d_jitter", "d_trend"):
        values = np.abs(finite([e[metric] for e in effects]))
        lims[metric] = float(values.max()) if values.size and values.any() else 1.0
    kind = str(env_cells[0]["kind"]) if env_cells else ""
    score_unit = SCORE_LABELS.get(kind, "score")
    titles = {
        ("score", True): "final score IQM, ERC off\n(" + score_unit + ")",
        ("score", False): "Δ final score (paired), ERC {b} − off\n(blue = higher with ERC)",
        ("jitter", True): "entropy jitter, ERC off",
        ("jitter", False): "Δ entropy jitter, ERC {b} − off\n(blue = less jitter with ERC)",
        ("trend", True): "entropy trend (log H / update), ERC off",
        ("trend", False): "Δ entropy trend, ERC {b} − off\n(blue = slower fall with ERC)",
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
        "band.\nFramed * = the paired difference to ERC off is significant (t-test, Holm over "
        "the map's cells). Empty cell = not run.\n"
        f"Unstable run = final entropy < {COLLAPSE_FACTOR:g}x its start, or any entropy > "
        f"{EXPLOSION_FACTOR:g}x its start, or the score lost > {SCORE_DROP_SHARE:.0%} of its "
        "best gain.",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))  # leave the three title lines free
    paths = save_figure(fig, Path(path))
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- methods compared


def plot_leaderboard(
    panels: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    reference: str,
    score_label: str,
    title: str,
    path: str | Path,
) -> list[Path]:
    """Bar chart of the methods' paired differences to ``reference`` in final score, one panel
    per point; returns the PNG and SVG paths.

    Args:
        panels: ``(panel title, rows)`` per point; each row a comparison of
            :func:`erc_gym.lab.stress.method_table` with ``reference`` (``method``, ``d_score``,
            its 95% t-interval ``d_score_lo`` / ``_hi``, ``significant``, ``primary``), in the
            order to draw (top to bottom).
        reference: the method compared with (the zero line).
        score_label: the score's unit.
        title: the figure's title.
        path: output path without suffix.

    Each bar is the mean per-seed difference with its 95% interval; a ``*`` after the method's
    name: significant after the family's Holm adjustment; red bars are below the reference,
    blue above, grey where the interval spans 0.
    """
    plt = pyplot()
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    height = max(2.5, 0.3 * max((len(rows) for _, rows in panels), default=1) + 1.2)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, height * nrows + 0.6), squeeze=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (name, rows) in zip(axes.flat, panels, strict=False):
        rows = list(rows)
        ys = np.arange(len(rows))[::-1]
        for y, row in zip(ys, rows, strict=True):
            d, lo, hi = row["d_score"], row["d_score_lo"], row["d_score_hi"]
            if not np.isfinite(d):
                continue
            color = "0.6"
            if np.isfinite(lo) and lo > 0:
                color = "tab:blue"
            elif np.isfinite(hi) and hi < 0:
                color = "tab:red"
            ax.barh(y, d, color=color, height=0.6)
            ax.plot([d], [y], marker="|", color="black", ms=8)  # visible where d is 0
            if np.isfinite(lo) and np.isfinite(hi):
                ax.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="none", ecolor="black", lw=1)
        labels = [
            r["method"]
            + (" *" if "score" in r["significant"] else "")
            + (" (P)" if r["primary"] else "")
            for r in rows
        ]
        ax.set_yticks(ys, labels, fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"Δ final score vs {reference}\n({score_label})", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"{title}\nBars: mean paired difference by seed with its 95% t-interval; * = significant "
        "after Holm (q < 0.05); (P) = declared primary.",
        fontsize=9,
    )
    fig.tight_layout()  # makes room for the title too
    paths = save_figure(fig, Path(path))
    plt.close(fig)
    return paths
