"""Deprecated: moved to :mod:`erc_gym.lab.analysis` (IQM, bootstrap and mean curves to
:mod:`erc_gym.lab.stats`). This module forwards every name for one release."""

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.analysis")

import erc_gym.lab.analysis as _analysis  # noqa: E402
import erc_gym.lab.stats as _stats  # noqa: E402
from erc_gym.lab.analysis import (  # noqa: E402
    SCORE_LABELS,
    SERIES_KEYS,
    STEP_LABELS,
    Run,
    experiment_above,
    find_experiments,
    grid_order,
    load_runs,
    stale_runs,
    summarize,
)
from erc_gym.lab.stats import bootstrap_ci, iqm, mean_curve  # noqa: E402

__all__ = [
    "SCORE_LABELS",
    "SERIES_KEYS",
    "STEP_LABELS",
    "Run",
    "bootstrap_ci",
    "experiment_above",
    "find_experiments",
    "grid_order",
    "iqm",
    "load_runs",
    "mean_curve",
    "stale_runs",
    "summarize",
]

__getattr__ = forward(__name__, _analysis, _stats)
