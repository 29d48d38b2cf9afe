"""Deprecated: moved to :mod:`erc_gym.lab.analysis` (IQM, bootstrap and mean curves to
:mod:`erc_gym.lab.stats`). This module forwards every name for one release."""

from typing import Any

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.analysis")

import erc_gym.lab.analysis as _analysis  # noqa: E402
import erc_gym.lab.stats as _stats  # noqa: E402

__all__ = [*_analysis.__all__, "bootstrap_ci", "iqm", "mean_curve"]


def __getattr__(name: str) -> Any:
    return forward(__name__, name, _analysis, _stats)
