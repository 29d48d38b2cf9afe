"""RL-Zoo-style hyperparameters for classic discrete control, with reference returns.

Each preset is a plain dict in the shape of rl-baselines3-zoo's ``hyperparams/ppo.yml`` (strings
such as ``"lin_0.001"`` for linear schedules are kept as the zoo writes them) and converts to
keyword arguments for :class:`~erc_gym.sb3.ERCPPO` / ``stable_baselines3.PPO`` with
:func:`ppo_kwargs`. ``reference`` holds the published returns to compare against.

Sources: rl-baselines3-zoo ``hyperparams/ppo.yml`` and ``benchmark.md``; CleanRL ``ppo.py``
(500k steps, 3 seeds).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

__all__ = ["PRESETS", "linear_schedule", "make_env_kwargs", "ppo_kwargs"]

#: Zoo hyperparameters per Gymnasium id, with the published returns under ``reference``.
PRESETS: dict[str, dict[str, Any]] = {
    "CartPole-v1": {
        "n_envs": 8,
        "n_timesteps": 100_000,
        "policy": "MlpPolicy",
        "n_steps": 32,
        "batch_size": 256,
        "gae_lambda": 0.8,
        "gamma": 0.98,
        "n_epochs": 20,
        "ent_coef": 0.0,
        "learning_rate": "lin_0.001",
        "clip_range": "lin_0.2",
        "reference": {"rl_zoo_ppo": 500.0, "cleanrl_ppo_500k": 490.0, "threshold": 475.0},
    },
    "Acrobot-v1": {
        "n_envs": 16,
        "n_timesteps": 1_000_000,
        "policy": "MlpPolicy",
        "normalize": True,
        "n_steps": 256,
        "gae_lambda": 0.94,
        "gamma": 0.99,
        "n_epochs": 4,
        "ent_coef": 0.0,
        "reference": {"rl_zoo_ppo": -73.5, "cleanrl_ppo_500k": -86.0, "threshold": -100.0},
    },
    "MountainCar-v0": {
        "n_envs": 16,
        "n_timesteps": 1_000_000,
        "policy": "MlpPolicy",
        "normalize": True,
        "n_steps": 16,
        "gae_lambda": 0.98,
        "gamma": 0.99,
        "n_epochs": 4,
        "ent_coef": 0.0,
        "reference": {"rl_zoo_ppo": -110.0, "threshold": -110.0},
    },
    "LunarLander-v3": {
        "n_envs": 16,
        "n_timesteps": 1_000_000,
        "policy": "MlpPolicy",
        "n_steps": 1024,
        "batch_size": 64,
        "gae_lambda": 0.98,
        "gamma": 0.999,
        "n_epochs": 4,
        "ent_coef": 0.01,
        "reference": {"rl_zoo_ppo_v2": 242.0, "threshold": 200.0},
    },
}

#: Keys of a preset that are not algorithm arguments.
_NON_ALGO_KEYS = {"n_envs", "n_timesteps", "policy", "normalize", "reference"}


def linear_schedule(initial: float) -> Callable[[float], float]:
    """``progress_remaining * initial`` (progress goes from 1 to 0), as the zoo's ``lin_X``.

    Progress is clamped at 0: SB3 collects whole rollouts, so when the total step count is not a
    multiple of the rollout size its progress ends below 0, and the zoo's schedule would give the
    last update a negative learning rate or clip range.
    """

    def schedule(progress_remaining: float) -> float:
        return max(progress_remaining, 0.0) * initial

    return schedule


def _parse(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("lin_"):
        return linear_schedule(float(value[4:]))
    return value


def ppo_kwargs(env_id: str, **overrides: Any) -> dict[str, Any]:
    """Algorithm keyword arguments of a preset (schedules parsed), updated with ``overrides``.

    Raises:
        KeyError: for an env id without a preset (the message lists the available ones).
    """
    if env_id not in PRESETS:
        raise KeyError(f"no preset for {env_id!r}; available: {sorted(PRESETS)}")
    preset = copy.deepcopy(PRESETS[env_id])
    kwargs = {k: _parse(v) for k, v in preset.items() if k not in _NON_ALGO_KEYS}
    kwargs.update(overrides)
    return kwargs


def make_env_kwargs(env_id: str) -> dict[str, Any]:
    """``n_envs`` and whether to wrap in ``VecNormalize`` (``normalize``) for a preset."""
    preset = PRESETS[env_id]
    return {"n_envs": preset["n_envs"], "normalize": bool(preset.get("normalize", False))}
