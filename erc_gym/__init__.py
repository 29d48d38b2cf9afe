"""erc_gym: Entropy Ratio Clipping (ERC, arXiv 2512.05591) from toy problems to language models.

The core is one policy loss (:func:`erc_gym.losses.policy_loss`) and one entropy module
(:mod:`erc_gym.entropy`); the SB3 algorithm :class:`ERCPPO` and the LLM trainer call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import erc_gym.envs  # noqa: F401  (registers the erc_gym/* Gymnasium ids)
from erc_gym.advantages import filter_groups, group_advantages, overlong_penalty
from erc_gym.entropy import entropy_from_logits, logprob_and_entropy
from erc_gym.losses import ERCConfig, LossConfig, LossOutput, policy_loss

if TYPE_CHECKING:
    from erc_gym.sb3 import ERCPPO

__version__ = "0.1.0"

__all__ = [
    "ERCPPO",
    "ERCConfig",
    "LossConfig",
    "LossOutput",
    "entropy_from_logits",
    "filter_groups",
    "group_advantages",
    "logprob_and_entropy",
    "overlong_penalty",
    "policy_loss",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing the loss must not import stable-baselines3.
    if name == "ERCPPO":
        from erc_gym.sb3 import ERCPPO

        return ERCPPO
    raise AttributeError(f"module 'erc_gym' has no attribute {name!r}")
