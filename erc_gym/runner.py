"""Deprecated: the experiment runner moved to :mod:`erc_gym.lab.runner` (grid:
:mod:`erc_gym.lab.grid`, configs: :mod:`erc_gym.lab.config`, run folders:
:mod:`erc_gym.lab.rundir`). This module forwards every name for one release."""

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.runner")

import erc_gym.lab.config as _config  # noqa: E402
import erc_gym.lab.grid as _grid  # noqa: E402
import erc_gym.lab.rundir as _rundir  # noqa: E402
import erc_gym.lab.runner as _runner  # noqa: E402
from erc_gym.lab.config import (  # noqa: E402
    ALGORITHMS,
    CONFIG_DIR,
    KINDS,
    find_experiment,
    list_experiments,
    load_experiment,
)
from erc_gym.lab.grid import RunSpec, expand  # noqa: E402
from erc_gym.lab.rundir import ConfigMismatch, RunLocked, resolved_config  # noqa: E402
from erc_gym.lab.runner import (  # noqa: E402
    ExperimentInterrupted,
    RunsFailed,
    run_experiment,
    run_one,
    stopped_by,
)

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

__getattr__ = forward(__name__, _runner, _rundir, _grid, _config)
