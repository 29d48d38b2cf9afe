"""Deprecated: moved to :mod:`erc_gym.lab.report`. This module forwards every name for one
release."""

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.report")

import erc_gym.lab.report as _report  # noqa: E402
from erc_gym.lab.report import COLUMNS, markdown_table, write_report  # noqa: E402

__all__ = ["COLUMNS", "markdown_table", "write_report"]

__getattr__ = forward(__name__, _report)
