"""erc_gym environments, registered with Gymnasium under the ``erc_gym/`` namespace.

Importing this package only registers ids (string entry points); an env's module is imported by
``gymnasium.make``. ``gymnasium.make("erc_gym.envs:VocabBandit-v0")`` imports and makes in one call.

============================== ==================================================================
id                             what
============================== ==================================================================
``erc_gym/VocabBandit-v0``     contextual bandit, V up to 151,936 actions, pretrained-like prior
``erc_gym/TokenSequence-v0``   token MDP without transformers: reverse the prompt
``erc_gym/TokenArithmetic-v0`` token MDP on arithmetic with a character tokenizer
============================== ==================================================================
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

__all__ = [
    "ENV_IDS",
    "CharTokenizer",
    "TokenArithmetic",
    "TokenEnv",
    "TokenSequence",
    "VocabBandit",
    "register_envs",
]

#: The registered ids.
ENV_IDS = ("erc_gym/VocabBandit-v0", "erc_gym/TokenSequence-v0", "erc_gym/TokenArithmetic-v0")

_ENTRY_POINTS = {
    "erc_gym/VocabBandit-v0": ("erc_gym.envs.vocab_bandit:VocabBandit", 1),
    "erc_gym/TokenSequence-v0": ("erc_gym.envs.token_sequence:TokenSequence", None),
    "erc_gym/TokenArithmetic-v0": ("erc_gym.envs.token_env:TokenArithmetic", None),
}


def register_envs() -> None:
    """Register every ``erc_gym/*`` id (idempotent)."""
    for env_id, (entry_point, max_steps) in _ENTRY_POINTS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, max_episode_steps=max_steps)


register_envs()

_LAZY = {
    "VocabBandit": "erc_gym.envs.vocab_bandit",
    "TokenSequence": "erc_gym.envs.token_sequence",
    "TokenEnv": "erc_gym.envs.token_env",
    "TokenArithmetic": "erc_gym.envs.token_env",
    "CharTokenizer": "erc_gym.envs.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'erc_gym.envs' has no attribute {name!r}")
