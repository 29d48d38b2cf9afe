"""Stable-Baselines3 integration: :class:`ERCPPO` and its rollout buffers."""

from erc_gym.sb3.buffers import (
    ERCDictRolloutBuffer,
    ERCDictRolloutBufferSamples,
    ERCRolloutBuffer,
    ERCRolloutBufferSamples,
)
from erc_gym.sb3.distributions import check_erc_action_space, state_entropy
from erc_gym.sb3.policies import TokenFeaturesExtractor, TokenLMPolicy
from erc_gym.sb3.ppo import ERCPPO

__all__ = [
    "ERCPPO",
    "ERCDictRolloutBuffer",
    "ERCDictRolloutBufferSamples",
    "ERCRolloutBuffer",
    "ERCRolloutBufferSamples",
    "TokenFeaturesExtractor",
    "TokenLMPolicy",
    "check_erc_action_space",
    "state_entropy",
]
