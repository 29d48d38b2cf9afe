"""verl v1 trainer mode ``erc_sync``: verl's synchronous PPO trainer with the ERC loss hook.

Import this module in every verl process with verl's own mechanism,
``VERL_USE_EXTERNAL_MODULES=erc_gym.integrations.verl_trainer``, and select it with
``trainer.v1.trainer_mode=erc_sync``. It is ``PPOTrainerSync`` unchanged except that, once the
workers exist, the actor's loss function becomes :func:`erc_gym.integrations.verl.erc_ppo_loss`
(through verl's ``set_loss_fn`` RPC), which hands the current entropy (training pass) and the old
one (the ``entropy`` verl's v1 trainer stores from its old-log-prob pass) to the ERC losses.
Needs verl's ``verl-core`` extra (TransferQueue, uvicorn, ...), as the v1 trainer itself does.
"""

from __future__ import annotations

from typing import Any

from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.config import omega_conf_to_dataclass

from erc_gym.integrations.verl import ERC_LOSS_MODES, install_erc_loss_fn

__all__ = ["ERCPPOTrainerSync", "check_erc_trainer_config"]


def check_erc_trainer_config(config: Any) -> None:
    """Refuse, naming the setting, a trainer config under which ERC cannot get its entropies.

    Raises:
        ValueError: on rollout-correction bypass mode (no old-log-prob pass, hence no H_old) or
            on-policy distillation (its loss function replaces ``ppo_loss``).
    """
    mode = config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla")
    if mode not in ERC_LOSS_MODES:
        return
    correction = config.algorithm.get("rollout_correction", None) or {}
    if correction.get("bypass_mode", False):
        raise ValueError(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={mode!r} needs the old policy's "
            "entropy from the old-log-prob pass, which algorithm.rollout_correction.bypass_mode="
            "True skips; set it to False"
        )
    distillation = config.get("distillation", None) or {}
    if distillation.get("enabled", False):
        raise ValueError(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={mode!r} cannot be combined with "
            "distillation.enabled=True (distillation replaces the PPO loss function)"
        )


@register_trainer("erc_sync")
class ERCPPOTrainerSync(PPOTrainerSync):
    """``PPOTrainerSync`` whose actor workers compute the loss with ``erc_ppo_loss``."""

    def _setup(self) -> None:
        check_erc_trainer_config(self.config)
        super()._setup()
        actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        install_erc_loss_fn(self.actor_rollout_wg, actor_config)
