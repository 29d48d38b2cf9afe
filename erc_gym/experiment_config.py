"""Deprecated: the experiment config schema moved to :mod:`erc_gym.lab.config` (the seed limits
to :mod:`erc_gym.limits`). This module forwards every name for one release."""

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.config")

import erc_gym.lab.config as _config  # noqa: E402
from erc_gym.lab.config import (  # noqa: E402
    ALGORITHMS,
    KINDS,
    ConfigError,
    ExperimentConfig,
    validate_experiment,
)
from erc_gym.limits import MAX_GRID_SEED as MAX_SEED  # noqa: E402
from erc_gym.limits import MAX_GRID_SEEDS as MAX_SEEDS  # noqa: E402

__all__ = [
    "ALGORITHMS",
    "KINDS",
    "MAX_SEED",
    "MAX_SEEDS",
    "ConfigError",
    "ExperimentConfig",
    "validate_experiment",
]

__getattr__ = forward(__name__, _config)
