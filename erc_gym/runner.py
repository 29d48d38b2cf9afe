"""Deprecated: the experiment runner moved to :mod:`erc_gym.lab.runner` (grid:
:mod:`erc_gym.lab.grid`, configs: :mod:`erc_gym.lab.config`, run folders:
:mod:`erc_gym.lab.rundir`). This module forwards every name for one release."""

from typing import Any

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.runner")

import erc_gym.lab.config as _config  # noqa: E402
import erc_gym.lab.grid as _grid  # noqa: E402
import erc_gym.lab.rundir as _rundir  # noqa: E402
import erc_gym.lab.runner as _runner  # noqa: E402

__all__ = [
    "ALGORITHMS",
    "CONFIG_DIR",
    "KINDS",
    "ConfigMismatch",
    "ExperimentInterrupted",
    "RunLocked",
    "RunSpec",
    "RunsFailed",
    "expand",
    "find_experiment",
    "list_experiments",
    "load_experiment",
    "resolved_config",
    "run_experiment",
    "run_one",
    "stopped_by",
]


def __getattr__(name: str) -> Any:
    return forward(__name__, name, _runner, _rundir, _grid, _config)
