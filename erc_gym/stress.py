"""Deprecated: the stress-map tables moved to :mod:`erc_gym.lab.stress` (axes:
:mod:`erc_gym.lab.grid` and :mod:`erc_gym.lab.kinds`; statistics: :mod:`erc_gym.lab.stats`;
figure: :mod:`erc_gym.lab.plots`; report section: :mod:`erc_gym.lab.report`). This module
forwards every name for one release."""

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.stress")

import erc_gym.lab.grid as _grid  # noqa: E402
import erc_gym.lab.kinds as _kinds  # noqa: E402
import erc_gym.lab.plots as _plots  # noqa: E402
import erc_gym.lab.report as _report  # noqa: E402
import erc_gym.lab.stats as _stats  # noqa: E402
import erc_gym.lab.stress as _stress  # noqa: E402
from erc_gym.lab.grid import AXES, axis_label, axis_points, check_axes  # noqa: E402
from erc_gym.lab.kinds import axis_settings  # noqa: E402
from erc_gym.lab.plots import plot_stress_map  # noqa: E402
from erc_gym.lab.report import band_rule_markdown, stress_markdown  # noqa: E402
from erc_gym.lab.stats import diff_ci, probability_of_improvement  # noqa: E402
from erc_gym.lab.stress import (  # noqa: E402
    COLLAPSE_FACTOR,
    EXPLOSION_FACTOR,
    SCORE_DROP_SHARE,
    band_rule_table,
    cell_table,
    claims_table,
    effect_table,
    instability,
)

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

__getattr__ = forward(__name__, _stress, _stats, _grid, _kinds, _plots, _report)
