"""Deprecated: moved to :mod:`erc_gym.lab.report`. This module forwards every name for one
release."""

from typing import Any

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.report")

import erc_gym.lab.report as _report  # noqa: E402

__all__ = list(_report.__all__)


def __getattr__(name: str) -> Any:
    return forward(__name__, name, _report)
