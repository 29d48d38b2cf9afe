"""Rollout buffers that carry the old policy's per-state entropy (the sb3-contrib pattern).

``ERCRolloutBuffer`` is SB3's ``RolloutBuffer`` plus one per-sample array, ``old_entropy``, which
is flattened and permuted together with the other fields, so every mini-batch gets the entropy of
*its own* states. The samples are SB3's NamedTuple with one extra field.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.type_aliases import TensorDict
from stable_baselines3.common.vec_env import VecNormalize

__all__ = [
    "ERCDictRolloutBuffer",
    "ERCDictRolloutBufferSamples",
    "ERCRolloutBuffer",
    "ERCRolloutBufferSamples",
]


class ERCRolloutBufferSamples(NamedTuple):
    """SB3's ``RolloutBufferSamples`` plus ``old_entropy``."""

    observations: th.Tensor
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    old_entropy: th.Tensor


class ERCDictRolloutBufferSamples(NamedTuple):
    """SB3's ``DictRolloutBufferSamples`` plus ``old_entropy``."""

    observations: TensorDict
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    old_entropy: th.Tensor


class _OldEntropyMixin:
    """Adds the ``old_entropy`` array to an SB3 rollout buffer; shared by both variants."""

    old_entropy: np.ndarray
    _samples_cls: Any
    buffer_size: int
    n_envs: int
    generator_ready: bool

    def reset(self) -> None:
        self.old_entropy = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)
        super().reset()  # type: ignore[misc]

    def set_old_entropy(self, entropy: np.ndarray) -> None:
        """Store ``(buffer_size, n_envs)`` entropies of the policy that collected the buffer.

        Must be called after collection and before :meth:`get` (which flattens the arrays).
        """
        if self.generator_ready:
            raise RuntimeError("set_old_entropy must be called before the buffer is read")
        expected = (self.buffer_size, self.n_envs)
        if entropy.shape != expected:
            raise ValueError(f"old entropy must have shape {expected}, got {entropy.shape}")
        self.old_entropy = entropy.astype(np.float32, copy=False)

    def get(self, batch_size: int | None = None) -> Generator[Any, None, None]:
        if not self.generator_ready:
            self.old_entropy = self.swap_and_flatten(self.old_entropy)  # type: ignore[attr-defined]
        yield from super().get(batch_size)  # type: ignore[misc]

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> Any:
        samples = super()._get_samples(batch_inds, env)  # type: ignore[misc]
        old_entropy = self.to_torch(self.old_entropy[batch_inds].flatten())  # type: ignore[attr-defined]
        return self._samples_cls(*samples, old_entropy=old_entropy)


class ERCRolloutBuffer(_OldEntropyMixin, RolloutBuffer):
    """``RolloutBuffer`` with a per-sample ``old_entropy`` field (see module docstring)."""

    _samples_cls = ERCRolloutBufferSamples


class ERCDictRolloutBuffer(_OldEntropyMixin, DictRolloutBuffer):
    """``DictRolloutBuffer`` with a per-sample ``old_entropy`` field."""

    _samples_cls = ERCDictRolloutBufferSamples
