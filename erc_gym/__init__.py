"""erc_gym: Entropy Ratio Clipping (ERC, arXiv 2512.05591) from toy problems to language models.

The core is one policy loss (:func:`erc_gym.losses.policy_loss`) and one entropy module
(:mod:`erc_gym.entropy`); the SB3 algorithm :class:`~erc_gym.sb3.ERCPPO`, the LLM trainer and the
TRL / verl integrations call them.

Importing this package is cheap: every public name is resolved on first use (PEP 562), so
``import erc_gym.losses`` or ``import erc_gym.entropy`` pulls in torch only -- no gymnasium,
stable-baselines3, matplotlib or transformers (a verl plugin is imported in every Ray worker).
The ``erc_gym/*`` Gymnasium ids are registered by ``import erc_gym.envs``; ``import erc_gym``
registers them too when gymnasium is already imported (``import gymnasium`` first, as usual).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from erc_gym.advantages import filter_groups, group_advantages, overlong_penalty
    from erc_gym.entropy import (
        entropy_from_logits,
        linear_logprob_and_entropy,
        logprob_and_entropy,
    )
    from erc_gym.losses import ERCConfig, LossConfig, LossOutput, policy_loss
    from erc_gym.sb3 import ERCPPO

__version__ = "0.1.0"

# public name -> module that defines it; imported on first attribute access.
_LAZY: dict[str, str] = {
    "ERCPPO": "erc_gym.sb3",
    "ERCConfig": "erc_gym.losses",
    "LossConfig": "erc_gym.losses",
    "LossOutput": "erc_gym.losses",
    "policy_loss": "erc_gym.losses",
    "entropy_from_logits": "erc_gym.entropy",
    "logprob_and_entropy": "erc_gym.entropy",
    "linear_logprob_and_entropy": "erc_gym.entropy",
    "filter_groups": "erc_gym.advantages",
    "group_advantages": "erc_gym.advantages",
    "overlong_penalty": "erc_gym.advantages",
}

__all__ = [
    "ERCPPO",
    "ERCConfig",
    "LossConfig",
    "LossOutput",
    "entropy_from_logits",
    "filter_groups",
    "group_advantages",
    "linear_logprob_and_entropy",
    "logprob_and_entropy",
    "overlong_penalty",
    "policy_loss",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'erc_gym' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if "gymnasium" in sys.modules:  # registering costs nothing once gymnasium is loaded
    import erc_gym.envs  # noqa: F401
