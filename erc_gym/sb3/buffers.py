"""Rollout buffers that carry the old policy's per-state entropy (the sb3-contrib pattern).

``ERCRolloutBuffer`` is SB3's ``RolloutBuffer`` plus one per-sample array, ``old_entropy``, which
is flattened and permuted together with the other fields, so every mini-batch gets the entropy of
*its own* states. The samples are SB3's NamedTuple with one extra field (and ``old_logits``, the
old policy's logits for the exact KL penalty, None unless :meth:`set_old_logits` filled them).
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
    old_logits: th.Tensor | None = None


class ERCDictRolloutBufferSamples(NamedTuple):
    """SB3's ``DictRolloutBufferSamples`` plus ``old_entropy``."""

    observations: TensorDict
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    old_entropy: th.Tensor
    old_logits: th.Tensor | None = None


class _OldEntropyMixin:
    """Adds the ``old_entropy`` array to an SB3 rollout buffer; shared by both variants."""

    old_entropy: np.ndarray
    _samples_cls: Any
    buffer_size: int
    n_envs: int
    generator_ready: bool

    old_logits: np.ndarray | None = None

    def reset(self) -> None:
        self.old_entropy = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)
        self.old_logits = None
        super().reset()  # type: ignore[misc]

    def set_old_logits(self, logits: np.ndarray) -> None:
        """Store ``(buffer_size, n_envs, n_actions)`` logits of the policy that collected the
        buffer (for the exact KL penalty); call after collection, before :meth:`get`."""
        if self.generator_ready:
            raise RuntimeError("set_old_logits must be called before the buffer is read")
        if logits.shape[:2] != (self.buffer_size, self.n_envs):
            raise ValueError(
                f"old logits must have shape ({self.buffer_size}, {self.n_envs}, n_actions), "
                f"got {logits.shape}"
            )
        self.old_logits = logits.astype(np.float32, copy=False)

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
            if self.old_logits is not None:
                self.old_logits = self.swap_and_flatten(self.old_logits)  # type: ignore[attr-defined]
        yield from super().get(batch_size)  # type: ignore[misc]

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> Any:
        samples = super()._get_samples(batch_inds, env)  # type: ignore[misc]
        old_entropy = self.to_torch(self.old_entropy[batch_inds].flatten())  # type: ignore[attr-defined]
        old_logits = (
            None if self.old_logits is None else self.to_torch(self.old_logits[batch_inds])  # type: ignore[attr-defined]
        )
        return self._samples_cls(*samples, old_entropy=old_entropy, old_logits=old_logits)


class ERCRolloutBuffer(_OldEntropyMixin, RolloutBuffer):
    """``RolloutBuffer`` with a per-sample ``old_entropy`` field (see module docstring)."""

    _samples_cls = ERCRolloutBufferSamples


class ERCDictRolloutBuffer(_OldEntropyMixin, DictRolloutBuffer):
    """``DictRolloutBuffer`` with a per-sample ``old_entropy`` field."""

    _samples_cls = ERCDictRolloutBufferSamples
