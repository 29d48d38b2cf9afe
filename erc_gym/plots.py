"""Deprecated: moved to :mod:`erc_gym.lab.plots` (``_pyplot`` and ``_save`` are now the public
``pyplot`` and ``save_figure``). This module forwards every name for one release."""

from typing import Any

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.plots")

import erc_gym.lab.plots as _plots  # noqa: E402

__all__ = list(_plots.__all__)


def __getattr__(name: str) -> Any:
    return forward(__name__, name, _plots, renamed={"_pyplot": "pyplot", "_save": "save_figure"})
