"""Per-state entropy of SB3 action distributions, through :mod:`erc_gym.entropy`.

SB3's own ``distribution.entropy()`` uses the textbook ``-sum(p log p)`` form; ERC's +-5% band on
near-deterministic states needs the stable kernel, so both the old and the new entropy of ERCPPO
come from here. Discrete actions only (``docs/method.md`` section 5.5): a Gaussian's entropy can
be negative and, with a state-independent std, is the same in every state, so the ratio carries
no information.
"""

from __future__ import annotations

import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    Distribution,
    MultiCategoricalDistribution,
)

from erc_gym.entropy import entropy_from_logits

__all__ = ["ERC_ACTION_SPACES", "check_erc_action_space", "state_entropy"]

#: Action spaces whose per-state entropy ERC can use.
ERC_ACTION_SPACES = (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def check_erc_action_space(action_space: spaces.Space) -> None:
    """Raise ``ValueError`` unless ERC can be used with ``action_space``."""
    if not isinstance(action_space, ERC_ACTION_SPACES):
        raise ValueError(
            f"ERC needs a discrete action space (Discrete, MultiDiscrete or MultiBinary), got "
            f"{action_space}. For continuous (Gaussian) actions the entropy can be negative and, "
            "with a state-independent std, is the same in every state, so the entropy ratio "
            "is meaningless. Pass erc_low=None, erc_high=None to train without ERC."
        )


def state_entropy(distribution: Distribution) -> th.Tensor:
    """Entropy of the action distribution in each state, ``(batch,)``, fp32, no gradient.

    MultiDiscrete and MultiBinary entropies are sums over the independent sub-actions.
    """
    if isinstance(distribution, CategoricalDistribution):
        return entropy_from_logits(distribution.distribution.logits)
    if isinstance(distribution, MultiCategoricalDistribution):
        parts = [entropy_from_logits(d.logits) for d in distribution.distribution]
        return th.stack(parts, dim=1).sum(dim=1)
    if isinstance(distribution, BernoulliDistribution):
        logits = distribution.distribution.logits
        two_class = th.stack([th.zeros_like(logits), logits], dim=-1)
        return entropy_from_logits(two_class).sum(dim=1)
    raise ValueError(
        f"ERC needs a Categorical, MultiCategorical or Bernoulli action distribution, got "
        f"{type(distribution).__name__}; pass erc_low=None, erc_high=None to train without ERC."
    )
