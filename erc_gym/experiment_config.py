"""Deprecated: the experiment config schema moved to :mod:`erc_gym.lab.config` (the seed limits
to :mod:`erc_gym.limits`: ``MAX_SEED`` here is ``MAX_GRID_SEED`` there, ``MAX_SEEDS``
``MAX_GRID_SEEDS``). This module forwards every name for one release."""

from typing import Any

from erc_gym._deprecated import forward, warn_moved

warn_moved(__name__, "erc_gym.lab.config")

import erc_gym.lab.config as _config  # noqa: E402
import erc_gym.limits as _limits  # noqa: E402

__all__ = [
    "ALGORITHMS",
    "KINDS",
    "MAX_SEED",
    "MAX_SEEDS",
    "ConfigError",
    "ExperimentConfig",
    "validate_experiment",
]


def __getattr__(name: str) -> Any:
    return forward(
        __name__,
        name,
        _config,
        _limits,
        renamed={"MAX_SEED": "MAX_GRID_SEED", "MAX_SEEDS": "MAX_GRID_SEEDS"},
    )
