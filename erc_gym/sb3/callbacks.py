"""SB3 callback that logs ERC's entropy diagnostics for any on-policy algorithm.

Importable as ``erc_gym.sb3.EntropyDynamicsCallback``; the diagnostics themselves are pure functions
in :mod:`erc_gym.diagnostics`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import obs_as_tensor
from torch import Tensor

from erc_gym.diagnostics import (
    audit_seed,
    clipped_vs_kept_old_entropy,
    entropy_volatility,
    grad_norm_spikes,
    ratio_histogram,
    state_audit,
    unsampled_drift,
)
from erc_gym.entropy import entropy_from_logits
from erc_gym.jsonl import append_jsonl

__all__ = ["EntropyDynamicsCallback"]


def _policy_logits(policy: Any, obs: Any) -> Tensor:
    """Full action logits of an SB3 policy, ``(N, sum of sub-action sizes)``."""
    dist = policy.get_distribution(obs)
    inner = dist.distribution
    if isinstance(inner, list):  # MultiCategorical: one Categorical per sub-action
        return torch.cat([d.logits for d in inner], dim=-1)
    return inner.logits


class EntropyDynamicsCallback(BaseCallback):
    """Logs ERC's diagnostics for any on-policy SB3 algorithm with a ``Discrete`` action space.

    After each rollout it keeps (up to ``max_states``) observations and actions with the
    collecting policy's full action distribution; after the update it recomputes the distribution
    on the same states and records, beside the algorithm's own ``train/*`` keys:

    * ``diagnostics/entropy``, ``diagnostics/entropy_old``: mean entropy after / before the update;
    * ``diagnostics/entropy_ratio_mean``, ``_min``, ``_max`` of ``H_new / H_old`` per state, and
      ``diagnostics/outside_band``, the share of states outside ``band`` (what ERC would clip);
    * ``diagnostics/erc_clipped_entropy_old``, ``diagnostics/erc_kept_entropy_old``;
    * ``diagnostics/tv_unsampled``: :func:`~erc_gym.diagnostics.unsampled_drift` against the
      sampled actions;
    * ``diagnostics/entropy_volatility`` and ``diagnostics/grad_norm_spikes`` so far (the latter
      from ``train/grad_norm`` when the algorithm logs it, as ERCPPO does);
    * ``diagnostics/entropy_ratio_hist`` (JSON output only):
      :func:`~erc_gym.diagnostics.ratio_histogram` counts.

    With ``clipping_path`` it also appends one line per update to that file (a run folder's
    ``clipping.jsonl``, keyed by ``time/total_timesteps``): the states' movement
    (:func:`~erc_gym.diagnostics.state_audit`: entropy ratio, ``KL(old || new)``, arg-max
    changes, against ``band``) and, for an ERCPPO update that computed ERC's entropies, who ERC
    clipped (:func:`~erc_gym.diagnostics.clip_audit`, ``ERCPPO.clip_audit``).

    Works with plain ``stable_baselines3.PPO`` and A2C as well as ERCPPO. The extra cost is two
    no-grad forward passes over at most ``max_states`` states per update.

    :param band: the ``(low, high)`` entropy-ratio band used for the clipped / kept split.
    :param max_states: states kept per rollout (the first ones, in buffer order).
    :param spike_k: a gradient-norm spike is ``> spike_k`` x the running median.
    :param clipping_path: the file of the per-update audit lines (None: not written).
    """

    def __init__(
        self,
        band: tuple[float, float] = (0.95, 1.05),
        max_states: int = 4096,
        spike_k: float = 3.0,
        verbose: int = 0,
        clipping_path: str | Path | None = None,
    ) -> None:
        super().__init__(verbose)
        if not 0 < band[0] < 1 < band[1]:
            raise ValueError(f"band must satisfy 0 < low < 1 < high, got {band}")
        self.band = band
        self.clipping_path = None if clipping_path is None else Path(clipping_path)
        self.max_states = max_states
        self.spike_k = spike_k
        self._snapshot: tuple[Any, Tensor, Tensor] | None = None
        self.entropy_history: list[float] = []
        self.grad_norm_history: list[float] = []

    def _on_training_start(self) -> None:
        if not isinstance(self.model.action_space, spaces.Discrete):
            raise ValueError(
                "EntropyDynamicsCallback needs a Discrete action space (the full action "
                f"distribution), got {self.model.action_space}"
            )
        if isinstance(self.model.observation_space, spaces.Dict):
            warnings.warn(
                "EntropyDynamicsCallback does not support Dict observations yet; it will log "
                "nothing for this model",
                stacklevel=2,
            )

    def _on_step(self) -> bool:
        return True

    def _distribution(self, obs: Any) -> tuple[Tensor, Tensor]:
        """``(logits, entropy)`` of the policy in each state (normalised logits)."""
        with torch.no_grad():
            logits = _policy_logits(self.model.policy, obs).float()
            return torch.log_softmax(logits, -1), entropy_from_logits(logits)

    def _on_rollout_end(self) -> None:
        buf = self.model.rollout_buffer  # type: ignore[attr-defined]
        obs_np = buf.observations
        if isinstance(obs_np, dict):
            return  # Dict observations: warned about at training start
        n = min(buf.buffer_size * buf.n_envs, self.max_states)
        obs_flat = obs_np.reshape(-1, *obs_np.shape[2:])[:n]
        actions = torch.as_tensor(buf.actions.reshape(-1)[:n], dtype=torch.long)
        obs = obs_as_tensor(obs_flat, self.model.device)
        logits, entropy = self._distribution(obs)
        self._snapshot = (obs, actions, torch.cat([logits, entropy[:, None]], dim=1).cpu())

    def _on_training_end(self) -> None:
        self._on_rollout_start()  # the last update has no next rollout

    def _on_rollout_start(self) -> None:
        if self._snapshot is None:
            return
        obs, actions, old = self._snapshot
        self._snapshot = None
        old_logits, old_h = old[:, :-1], old[:, -1]
        new_logits, new_h = self._distribution(obs)
        new_logits, new_h = new_logits.cpu(), new_h.cpu()
        old_probs, new_probs = old_logits.exp(), new_logits.exp()
        if self.clipping_path is not None:
            self._write_audit(old_logits, new_logits)
        rho = (new_h.double() + 1e-8) / (old_h.double() + 1e-8)
        keep = (rho > self.band[0]) & (rho < self.band[1])
        sampled = torch.zeros_like(old_probs, dtype=torch.bool)
        sampled[torch.arange(len(actions)), actions] = True
        clipped_h, kept_h = clipped_vs_kept_old_entropy(old_h, keep)
        self.entropy_history.append(float(new_h.mean()))
        grad_norm = self.logger.name_to_value.get("train/grad_norm")
        if grad_norm is not None:
            self.grad_norm_history.append(float(grad_norm))
        record = self.logger.record
        record("diagnostics/entropy", float(new_h.mean()))
        record("diagnostics/entropy_old", float(old_h.mean()))
        record("diagnostics/entropy_ratio_mean", float(rho.mean()))
        record("diagnostics/entropy_ratio_min", float(rho.min()))
        record("diagnostics/entropy_ratio_max", float(rho.max()))
        record("diagnostics/outside_band", float((~keep).double().mean()))
        record("diagnostics/erc_clipped_entropy_old", clipped_h)
        record("diagnostics/erc_kept_entropy_old", kept_h)
        record("diagnostics/tv_unsampled", unsampled_drift(old_probs, new_probs, sampled))
        record("diagnostics/entropy_volatility", entropy_volatility(self.entropy_history))
        record(
            "diagnostics/grad_norm_spikes", grad_norm_spikes(self.grad_norm_history, self.spike_k)
        )
        record(
            "diagnostics/entropy_ratio_hist",
            ratio_histogram(rho),
            exclude=("stdout", "log", "csv", "tensorboard"),
        )

    def _write_audit(self, old_logits: Tensor, new_logits: Tensor) -> None:
        """Append this update's audit line to ``clipping_path``."""
        assert self.clipping_path is not None
        steps = int(self.model.num_timesteps)
        seed = audit_seed(self.model.seed or 0, steps)
        line: dict[str, Any] = {"time/total_timesteps": steps}
        loss_audit = getattr(self.model, "clip_audit", None)
        band = self.band
        if loss_audit:
            line |= loss_audit
            band = (float(loss_audit["band"][0]), float(loss_audit["band"][1]))
        line |= state_audit(old_logits, new_logits, band, seed=seed)
        append_jsonl(self.clipping_path, line)
