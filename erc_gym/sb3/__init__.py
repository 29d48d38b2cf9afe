"""Stable-Baselines3 integration: :class:`ERCPPO`, its rollout buffers, and
:class:`EntropyDynamicsCallback` (ERC's diagnostics for any on-policy SB3 algorithm)."""

from erc_gym.sb3.buffers import (
    ERCDictRolloutBuffer,
    ERCDictRolloutBufferSamples,
    ERCRolloutBuffer,
    ERCRolloutBufferSamples,
)
from erc_gym.sb3.callbacks import EntropyDynamicsCallback
from erc_gym.sb3.distributions import check_erc_action_space, state_entropy
from erc_gym.sb3.policies import TokenFeaturesExtractor, TokenLMPolicy
from erc_gym.sb3.ppo import ERCPPO

__all__ = [
    "ERCPPO",
    "ERCDictRolloutBuffer",
    "ERCDictRolloutBufferSamples",
    "ERCRolloutBuffer",
    "ERCRolloutBufferSamples",
    "EntropyDynamicsCallback",
    "TokenFeaturesExtractor",
    "TokenLMPolicy",
    "check_erc_action_space",
    "state_entropy",
]
