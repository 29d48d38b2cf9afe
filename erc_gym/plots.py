"""Deprecated: moved to :mod:`erc_gym.lab.plots` (``_pyplot`` and ``_save`` are now the public
``pyplot`` and ``save_figure``). This module forwards every name for one release."""

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.plots")

import erc_gym.lab.plots as _plots  # noqa: E402
from erc_gym.lab.plots import (  # noqa: E402
    ALGORITHM_STYLES,
    PANELS,
    plot_curves,
    plot_experiment,
    plot_ratio_heatmaps,
    smooth,
    variant_style,
)

__all__ = [
    "ALGORITHM_STYLES",
    "PANELS",
    "plot_curves",
    "plot_experiment",
    "plot_ratio_heatmaps",
    "smooth",
    "variant_style",
]

__getattr__ = forward(__name__, _plots, renamed={"_pyplot": "pyplot", "_save": "save_figure"})
