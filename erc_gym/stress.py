"""Deprecated: the stress-map tables moved to :mod:`erc_gym.lab.stress` (axes:
:mod:`erc_gym.lab.grid` and :mod:`erc_gym.lab.kinds`; statistics: :mod:`erc_gym.lab.stats`;
figure: :mod:`erc_gym.lab.plots`; report section: :mod:`erc_gym.lab.report`). This module
forwards every name for one release."""

from typing import Any

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.stress")

import erc_gym.lab.grid as _grid  # noqa: E402
import erc_gym.lab.kinds as _kinds  # noqa: E402
import erc_gym.lab.plots as _plots  # noqa: E402
import erc_gym.lab.report as _report  # noqa: E402
import erc_gym.lab.stats as _stats  # noqa: E402
import erc_gym.lab.stress as _stress  # noqa: E402

__all__ = [
    *(n for n in _stress.__all__ if n not in ("CLAIMS", "CellKey", "finished_stress_runs")),
    *("AXES", "axis_label", "axis_points", "axis_settings", "check_axes"),
    *("band_rule_markdown", "stress_markdown", "plot_stress_map"),
    *("diff_ci", "probability_of_improvement"),
]


def __getattr__(name: str) -> Any:
    return forward(__name__, name, _stress, _stats, _grid, _kinds, _plots, _report)
