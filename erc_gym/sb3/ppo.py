"""ERCPPO: Stable-Baselines3 PPO with Entropy Ratio Clipping, clip-higher, GPPO and dual-clip."""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar, Literal, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import FloatSchedule, explained_variance, obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch.nn import functional as F

from erc_gym.adaptive_band import (
    AdaptiveERCBand,
    check_target_clip_fraction,
    off_policy_clip_fraction,
)
from erc_gym.adaptive_coef import AdaptiveEntropyCoef, AdaptiveKLCoef
from erc_gym.diagnostics import audit_seed, clip_audit
from erc_gym.entropy import SMALL_VOCAB, kl_from_logits, small_action_logprob_and_entropy
from erc_gym.losses import (
    DPPO_VARIANTS,
    LOSS_METRIC_KEYS,
    ERCConfig,
    LossConfig,
    LossStats,
    loss_metrics,
    policy_loss,
)
from erc_gym.methods import CLIP_VARIANTS, MethodRuntime, MethodSettings, method_metrics
from erc_gym.sb3.buffers import ERCDictRolloutBuffer, ERCRolloutBuffer
from erc_gym.sb3.distributions import ERC_ACTION_SPACES, check_erc_action_space, state_entropy
from erc_gym.sb3.policies import TokenLMPolicy

__all__ = ["ERCPPO", "METHOD_KWARGS"]

SelfERCPPO = TypeVar("SelfERCPPO", bound="ERCPPO")

#: ``policy_loss`` metrics that SB3 has under its own keys (``train/policy_gradient_loss``,
#: its two-sided ``train/clip_fraction``, ``train/approx_kl``) or that ERCPPO does not log.
_NOT_LOGGED = {"pg_loss", "clip_fraction", "approx_kl", "ppo_kl", "ratio_mean"}
_NOT_LOGGED |= {"erc_kept_entropy_old_mean"}
#: ERC keys logged as ``train/<key>``, from ``policy_loss`` metrics (name there -> name here):
#: the loss's list of keys, filtered, with the entropies under SB3-style names.
_ERC_LOG_KEYS = {
    key: {"entropy_mean": "entropy", "entropy_old_mean": "entropy_old"}.get(key, key)
    for key in LOSS_METRIC_KEYS
    if key not in _NOT_LOGGED
}

# Rows per no-grad pass when scoring a rollout's old entropies (bounds memory on big buffers).
_ENTROPY_PASS_ROWS = 4096

# rollout_buffer_class values that mean "SB3's default buffer" (see ERCPPO._setup_model).
_SB3_DEFAULT_BUFFERS = (None, RolloutBuffer, DictRolloutBuffer)

#: MethodSettings fields ERCPPO takes as keyword arguments (``ent_coef`` and ``target_kl`` are
#: SB3's own arguments, ``clip_variant`` ERCPPO's).
METHOD_KWARGS = tuple(
    f
    for f in MethodSettings.__dataclass_fields__
    if f not in ("ent_coef", "target_kl", "clip_variant")
)


def make_env(env_id: str) -> gym.Env:
    """Make a Gymnasium id as SB3 does for ``ERCPPO("MlpPolicy", "CartPole-v1")``, with two
    differences: the ``erc_gym/*`` ids are registered first (no ``import erc_gym.envs`` needed),
    and ``render_mode="rgb_array"`` (SB3's default, for video recording) is asked only of an env
    that has it -- the token envs render text, and Gymnasium warns on a mode they lack.
    """
    from gymnasium.envs.registration import load_env_creator

    import erc_gym.envs  # noqa: F401  (registers the erc_gym/* ids)

    spec = gym.spec(env_id)
    creator = (
        load_env_creator(spec.entry_point)
        if isinstance(spec.entry_point, str)
        else spec.entry_point
    )
    if "rgb_array" not in getattr(creator, "metadata", {}).get("render_modes", ()):
        return gym.make(env_id)
    try:
        return gym.make(env_id, render_mode="rgb_array")
    except TypeError:  # as SB3: an env whose constructor takes no render_mode
        return gym.make(env_id)


class ERCPPO(PPO):
    """PPO with Entropy Ratio Clipping (Su et al. 2025, arXiv 2512.05591).

    A drop-in replacement for ``stable_baselines3.PPO``: every PPO argument keeps its name,
    default and meaning. The policy-gradient term is computed by
    :func:`erc_gym.losses.policy_loss`; the value loss, ``clip_range_vf``, the entropy bonus,
    ``target_kl`` early stopping and gradient clipping are SB3's.

    ERC stops the policy gradient of every state whose entropy ratio
    ``H(pi_new(.|s)) / H(pi_old(.|s))`` leaves ``(erc_low, erc_high)``. The old policy's entropy is
    computed once per rollout, right after collection (no extra pass over the environment), and
    stored per sample in an :class:`~erc_gym.sb3.buffers.ERCRolloutBuffer`, so it follows the
    mini-batch permutation.

    :param policy: as in PPO ("MlpPolicy", "CnnPolicy", "MultiInputPolicy" or a class).
    :param env: as in PPO.
    :param erc_low: lower bound of the entropy-ratio band (float or schedule of the remaining
        progress). ``None`` together with ``erc_high=None`` disables ERC.
    :param erc_high: upper bound of the band. On 2-action tasks a band as narrow as 0.95/1.05
        masks many samples; see ``docs/sb3_band_study.md`` for measured defaults.
    :param erc_target_clip_fraction: this project's adaptive band (not the paper's, see
        :mod:`erc_gym.adaptive_band`): after each update, widen or narrow the band so that ERC
        clips about this share of the samples of the update's off-policy mini-batches (all but
        the first). The band starts at ``(erc_low, erc_high)``, which must then be numbers.
        ``None`` (default): the fixed band.
    :param clip_range_high: upper clip range (DAPO clip-higher), float or schedule; ``None`` uses
        ``clip_range`` (symmetric PPO clip).
    :param clip_variant: ``"ppo"`` (clip stops the gradient) or ``"gppo"`` (gradient-preserving
        clip, arXiv 2508.07629).
    :param dual_clip: dual-clip constant ``c > 1`` for negative advantages, or ``None``.
    :param kwargs: every other :class:`stable_baselines3.PPO` argument, and the rival methods,
        baselines and controls of :class:`erc_gym.methods.MethodSettings` by their field names
        (``control_low``, ``random_mask_matched``, ``equal_step``, ``clip_cov_ratio``,
        ``kl_cov_ratio``, ``top_entropy_quantile``, ``entropy_target``, ``kl_coef``,
        ``kl_target``, ...; ``docs/rivals.md``). ``clip_variant`` also takes ``"none"``,
        ``"dppo-tv"`` and ``"dppo-kl"``. SB3's ``ent_coef`` is the entropy bonus (its starting
        value with ``entropy_target``) and ``target_kl`` SB3's early stop. A KL penalty is the
        exact per-state KL(pi_old || pi) for ``Discrete`` actions (the old logits are stored
        with the rollout), the k3 estimate otherwise.

    Logged beside SB3's ``train/*`` keys (means over the update's mini-batches, see
    ``docs/metrics.md``): ``train/entropy`` (positive), ``train/entropy_old``,
    ``train/entropy_ratio_{mean,min,max}``, ``train/erc_clip_fraction{,_low,_high}``,
    ``train/erc_clipped_entropy_old_mean``, ``train/clip_fraction_{low,high}``,
    ``train/dual_clip_fraction`` and ``train/grad_norm`` (before clipping). ``train/clip_fraction``
    keeps SB3's two-sided meaning.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        **PPO.policy_aliases,
        "TokenLMPolicy": TokenLMPolicy,
    }

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str | None,
        *args: Any,
        erc_low: float | Schedule | None = 0.95,
        erc_high: float | Schedule | None = 1.05,
        erc_target_clip_fraction: float | None = None,
        clip_range_high: float | Schedule | None = None,
        clip_variant: Literal["ppo", "gppo"] = "ppo",
        dual_clip: float | None = None,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        if (erc_low is None) != (erc_high is None):
            raise ValueError(
                f"erc_low and erc_high must both be set or both be None (ERC off), got "
                f"erc_low={erc_low!r}, erc_high={erc_high!r}"
            )
        if clip_variant not in CLIP_VARIANTS:
            raise ValueError(f"clip_variant must be one of {CLIP_VARIANTS}, got {clip_variant!r}")
        if dual_clip is not None and not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 or None, got dual_clip={dual_clip}")
        if dual_clip is not None and (clip_variant in DPPO_VARIANTS or clip_variant == "none"):
            raise ValueError(
                f"clip_variant={clip_variant!r} takes no dual_clip (got dual_clip={dual_clip}): "
                "DPPO truncates its weight with ratio_cap, 'none' has no clip"
            )
        #: The rival methods' settings (erc_gym.methods.MethodSettings).
        self.method_settings = MethodSettings(
            clip_variant=clip_variant,
            ent_coef=kwargs.get("ent_coef", 0.0),
            target_kl=kwargs.get("target_kl"),
            **{name: kwargs.pop(name) for name in METHOD_KWARGS if name in kwargs},
        )
        self.method_settings.check_methods(erc_on=erc_low is not None and erc_high is not None)
        for name, value in (
            ("erc_low", erc_low),
            ("erc_high", erc_high),
            ("clip_range_high", clip_range_high),
        ):
            # SB3's FloatSchedule would fail later with "The learning rate schedule must be ..."
            if not (value is None or callable(value) or isinstance(value, int | float)):
                raise ValueError(f"{name} must be a number, a schedule or None, got {value!r}")
        if isinstance(clip_range_high, int | float) and not 0 <= clip_range_high < math.inf:
            # a negative or NaN constant became a clip range of 0 (max(0, x)) without a word
            raise ValueError(
                "clip_range_high must be a finite number >= 0 "
                f"(DAPO: {LossConfig.dapo().eps_high:g}), a schedule or None, "
                f"got clip_range_high={clip_range_high}"
            )
        if isinstance(erc_low, int | float) and isinstance(erc_high, int | float):
            ERCConfig(low=float(erc_low), high=float(erc_high))  # validates constant bands now
        check_target_clip_fraction(erc_target_clip_fraction, erc_low, erc_high)
        self.erc_target_clip_fraction = erc_target_clip_fraction
        #: The adaptive band's controller (None: the fixed band or ERC off).
        self.erc_band_control: AdaptiveERCBand | None = None
        if erc_target_clip_fraction is not None:
            if not (isinstance(erc_low, int | float) and isinstance(erc_high, int | float)):
                raise ValueError(
                    f"erc_target_clip_fraction={erc_target_clip_fraction!r} adapts the band "
                    "itself: erc_low and erc_high must be numbers (the starting band), not "
                    f"schedules, got erc_low={erc_low!r}, erc_high={erc_high!r}"
                )
            self.erc_band_control = AdaptiveERCBand(
                erc_target_clip_fraction, low=float(erc_low), high=float(erc_high)
            )
        self.erc_low = erc_low
        self.erc_high = erc_high
        self.clip_range_high = clip_range_high
        self.clip_variant = clip_variant
        self.dual_clip = dual_clip
        #: Adaptive coefficients' controllers (None: fixed), saved with the model.
        self.entropy_control: AdaptiveEntropyCoef | None = None
        self.kl_control: AdaptiveKLCoef | None = None
        if isinstance(env, str):
            env = make_env(env)
        super().__init__(policy, env, *args, _init_setup_model=False, **kwargs)  # type: ignore[arg-type,misc]
        if _init_setup_model:
            self._setup_model()

    @property
    def erc_enabled(self) -> bool:
        """Whether ERC is on (both band bounds set)."""
        return self.erc_low is not None and self.erc_high is not None

    def _excluded_save_params(self) -> list[str]:
        # the token gates' generator is not picklable; it is re-seeded on load
        return [*super()._excluded_save_params(), "method_runtime", "clip_audit"]

    def _setup_methods(self) -> None:
        """The methods' run-time state; a loaded model keeps its saved controllers."""
        settings = getattr(self, "method_settings", None)
        if settings is None:  # a model saved before the methods existed
            settings = MethodSettings(clip_variant=getattr(self, "clip_variant", "ppo"))
        self.method_settings = settings
        runtime = MethodRuntime(settings, seed=self.seed or 0, device=self.device)
        if getattr(self, "entropy_control", None) is not None:
            runtime.entropy = self.entropy_control
        if getattr(self, "kl_control", None) is not None:
            runtime.kl = self.kl_control
        self.entropy_control, self.kl_control = runtime.entropy, runtime.kl
        self.method_runtime = runtime
        #: The last update's :func:`erc_gym.diagnostics.clip_audit` (None: ERC's entropies were
        #: not computed in it, or no update yet); not saved with the model.
        self.clip_audit: dict[str, Any] | None = None
        needs_entropy = LossConfig(
            gate=settings.token_gate(),
            equal_step=settings.control_band() if settings.equal_step else None,
        ).needs_entropies
        if needs_entropy and not isinstance(self.action_space, ERC_ACTION_SPACES):
            raise ValueError(
                "the high-entropy gate, the matched random control and the equal-step control "
                f"rank states by their entropy, which needs a discrete action space, got "
                f"{self.action_space}"
            )

    @property
    def _kl_exact(self) -> bool:
        """A KL penalty with the exact per-state KL (``Discrete`` actions: logits stored)."""
        return self.method_settings.needs_kl and isinstance(self.action_space, spaces.Discrete)

    def _setup_model(self) -> None:
        self._setup_methods()
        if self.erc_enabled:
            check_erc_action_space(self.action_space)
        # None is "SB3 chooses"; SB3's own RolloutBuffer / DictRolloutBuffer is what a plain PPO
        # checkpoint stores after that choice, so ERCPPO.load() of a PPO model would otherwise
        # get a buffer without old_entropy. The ERC buffers are drop-in
        # subclasses of exactly those two; any other class is the user's and is kept.
        if self.rollout_buffer_class in _SB3_DEFAULT_BUFFERS and isinstance(
            self.action_space, ERC_ACTION_SPACES
        ):
            dict_obs = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = ERCDictRolloutBuffer if dict_obs else ERCRolloutBuffer
        super()._setup_model()
        if self.erc_enabled and not isinstance(
            self.rollout_buffer, ERCRolloutBuffer | ERCDictRolloutBuffer
        ):
            raise ValueError(
                f"ERC needs a rollout buffer with an old_entropy field (ERCRolloutBuffer or "
                f"ERCDictRolloutBuffer), got rollout_buffer_class={self.rollout_buffer_class}"
            )
        if self.erc_enabled:
            self.erc_low = FloatSchedule(self.erc_low)  # type: ignore[arg-type]
            self.erc_high = FloatSchedule(self.erc_high)  # type: ignore[arg-type]
        if self.clip_range_high is not None:
            self.clip_range_high = FloatSchedule(self.clip_range_high)

    def _update_current_progress_remaining(self, num_timesteps: int, total_timesteps: int) -> None:
        """SB3's progress (1 -> 0), clamped at 0.

        SB3 collects whole rollouts, so when ``total_timesteps`` is not a multiple of
        ``n_steps * n_envs`` the last rollout overshoots and SB3's progress goes below 0: a linear
        schedule then gives a negative learning rate and clip range for the last update (which
        ascends the loss with every ratio "clipped"). Every schedule of ERCPPO (learning rate,
        clip ranges, ERC band) sees progress in [0, 1] instead.
        """
        super()._update_current_progress_remaining(num_timesteps, total_timesteps)
        self._current_progress_remaining = max(0.0, self._current_progress_remaining)

    @property
    def _tracks_entropy(self) -> bool:
        return isinstance(self.rollout_buffer, ERCRolloutBuffer | ERCDictRolloutBuffer)

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """SB3's collection, then one no-grad pass that stores the old per-state entropies.

        The parameters do not change between collection and :meth:`train`, so this pass gives
        exactly the collecting policy's entropies without touching the environment.
        """
        complete = super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        if complete and isinstance(rollout_buffer, ERCRolloutBuffer | ERCDictRolloutBuffer):
            logits: list[np.ndarray] | None = [] if self._kl_exact else None
            rollout_buffer.set_old_entropy(self._buffer_entropy(rollout_buffer, logits))
            if logits is not None:
                shape = (rollout_buffer.buffer_size, rollout_buffer.n_envs, -1)
                rollout_buffer.set_old_logits(np.concatenate(logits).reshape(shape))
        return complete

    def _buffer_entropy(
        self,
        buffer: ERCRolloutBuffer | ERCDictRolloutBuffer,
        logits: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """The old policy's per-state entropies (and, into ``logits``, its logits)."""
        n = buffer.buffer_size * buffer.n_envs
        obs: Any = buffer.observations
        if isinstance(obs, dict):
            flat: Any = {k: v.reshape(n, *v.shape[2:]) for k, v in obs.items()}
        else:
            flat = obs.reshape(n, *obs.shape[2:])
        actions = buffer.actions.reshape(n, *buffer.actions.shape[2:])
        fused = self._fused_discrete() and logits is None
        out = np.empty(n, dtype=np.float32)
        with th.no_grad():
            for start in range(0, n, _ENTROPY_PASS_ROWS):
                sl = slice(start, start + _ENTROPY_PASS_ROWS)
                part = {k: v[sl] for k, v in flat.items()} if isinstance(flat, dict) else flat[sl]
                obs_t = obs_as_tensor(part, self.device)
                # float32, as RolloutBuffer._get_samples hands actions to train()
                act_t = self._train_actions(buffer.to_torch(actions[sl].astype(np.float32)))
                # The distribution train() evaluates (not get_distribution, which a policy may
                # override for prediction only), so an on-policy mini-batch has rho = 1.
                if fused:
                    entropy = self._evaluate_discrete(obs_t, act_t)[3]
                else:
                    dist = self._evaluate(obs_t, act_t)[3]
                    entropy = state_entropy(dist)
                    if logits is not None:
                        logits.append(_logits(dist).float().cpu().numpy())
                out[sl] = entropy.cpu().numpy()
        return out.reshape(buffer.buffer_size, buffer.n_envs)

    def _train_actions(self, actions: th.Tensor) -> th.Tensor:
        """Buffer actions in the form ``train()`` passes them to the policy (as SB3 PPO)."""
        if isinstance(self.action_space, spaces.Discrete):
            return actions.long().flatten()
        return actions

    def _latents(self, observations: Any) -> tuple[th.Tensor, th.Tensor]:
        """``(latent_pi, latent_vf)`` as ``ActorCriticPolicy.evaluate_actions`` computes them."""
        policy = self.policy
        features = policy.extract_features(observations)
        if policy.share_features_extractor:
            return policy.mlp_extractor(features)
        pi_features, vf_features = features
        return (
            policy.mlp_extractor.forward_actor(pi_features),
            policy.mlp_extractor.forward_critic(vf_features),
        )

    def _evaluate(
        self, observations: Any, actions: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, Distribution]:
        """``policy.evaluate_actions`` plus the distribution it built, without a second forward.

        A policy with ``evaluate_actions_with_distribution`` is asked for it. Where
        ``evaluate_actions`` is SB3's, its steps run here and the distribution is the object that
        ``_get_action_dist_from_latent`` returned (an override may build a new one rather than
        update ``policy.action_dist``). Otherwise ``policy.action_dist`` is taken, where SB3
        policies build their distribution.
        """
        policy = self.policy
        custom = getattr(policy, "evaluate_actions_with_distribution", None)
        if custom is not None:
            return custom(observations, actions)
        if (
            isinstance(policy, ActorCriticPolicy)
            and type(policy).evaluate_actions is ActorCriticPolicy.evaluate_actions
        ):
            latent_pi, latent_vf = self._latents(observations)
            distribution = policy._get_action_dist_from_latent(latent_pi)
            log_prob = distribution.log_prob(actions)
            values = policy.value_net(latent_vf)
            return values, log_prob, distribution.entropy(), distribution
        values, log_prob, entropy = policy.evaluate_actions(observations, actions)
        return values, log_prob, entropy, policy.action_dist

    def _fused_discrete(self) -> bool:
        """Whether ERC-on mini-batches can use :meth:`_evaluate_discrete`.

        Only where it provably builds the policy's own distribution,
        ``Categorical(logits=action_net(latent_pi))``: ``Discrete`` with at most ``SMALL_VOCAB``
        actions, an ``ActorCriticPolicy`` whose ``evaluate_actions``,
        ``_get_action_dist_from_latent`` and ``get_distribution`` are SB3's own (an override may
        change the logits, e.g. a temperature or an action mask), and an action distribution that
        is exactly ``CategoricalDistribution``. Feature extractors and networks may be anything:
        the fused path calls them. Every other policy takes the general path.
        """
        policy = self.policy
        cls = type(policy)
        return (
            isinstance(self.action_space, spaces.Discrete)
            and int(self.action_space.n) <= SMALL_VOCAB
            and isinstance(policy, ActorCriticPolicy)
            and cls.evaluate_actions is ActorCriticPolicy.evaluate_actions
            and cls._get_action_dist_from_latent is ActorCriticPolicy._get_action_dist_from_latent
            and cls.get_distribution is ActorCriticPolicy.get_distribution
            and type(policy.action_dist) is CategoricalDistribution
            and getattr(policy, "evaluate_actions_with_distribution", None) is None
        )

    def _evaluate_discrete(
        self, observations: Any, actions: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        """``evaluate_actions`` for Discrete actions from one float64 log-softmax.

        Returns ``(values, log_prob, entropy, new_entropy)``: the first three as SB3's (log-prob and
        entropy differentiable, in the logits' dtype), ``new_entropy`` the detached fp32 per-state
        entropy for the ERC mask. The forward pass mirrors ``ActorCriticPolicy.evaluate_actions``;
        log-prob and entropy come from
        :func:`erc_gym.entropy.small_action_logprob_and_entropy` (the entropy module's float64
        small-action formula, with plain autograd), and one log-softmax replaces SB3's
        distribution object, its separate log-prob and entropy, and a second entropy pass for ERC.
        """
        policy = self.policy
        latent_pi, latent_vf = self._latents(observations)
        logits = policy.action_net(latent_pi)
        values = policy.value_net(latent_vf)
        log_prob, entropy = small_action_logprob_and_entropy(logits, actions.long().reshape(-1))
        return (
            values,
            log_prob.to(logits.dtype),
            entropy.to(logits.dtype),
            entropy.detach().float(),
        )

    def _loss_config(self) -> LossConfig:
        progress = self._current_progress_remaining
        # Progress is clamped at 0 (see _update_current_progress_remaining), but a user's schedule
        # may still return a negative clip range; the loss requires eps >= 0.
        eps_low = max(0.0, float(self.clip_range(progress)))  # type: ignore[operator]
        eps_high = (
            max(0.0, float(self.clip_range_high(progress)))  # type: ignore[operator]
            if self.clip_range_high is not None
            else eps_low
        )
        erc = None
        if self.erc_band_control is not None:
            erc = self.erc_band_control.band
        elif self.erc_enabled:
            erc = ERCConfig(
                low=float(self.erc_low(progress)),  # type: ignore[operator,misc]
                high=float(self.erc_high(progress)),  # type: ignore[operator,misc]
            )
        base = LossConfig(
            clip=self.clip_variant if self.clip_variant in ("ppo", "gppo") else "ppo",
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip_c=self.dual_clip,
            erc=erc,
            aggregation="token-mean",
        )
        # the bonus stays SB3's own term (ent_coef); the KL is exact where the logits are stored
        return self.method_settings.apply_to(
            base, kl_estimator="exact" if self._kl_exact else "k3", entropy_bonus=False
        )

    # ------------------------------------------------------------------------------------------
    # train() mirrors stable_baselines3 2.9.2 PPO.train (stable_baselines3/ppo/ppo.py). SB3 has no
    # hook for the surrogate, so the method is copied once; differences are marked "ERC:". Keep it
    # in step with PPO.train when upgrading SB3 -- tests/sb3/test_ppo.py checks that ERCPPO with
    # ERC off holds exactly SB3 PPO's parameters after training.
    # ------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Update policy using the currently gathered rollout buffer."""
        started = time.perf_counter()  # ERC: the update's wall time (time/train_seconds)
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
        # ERC: one loss configuration per update (schedules are evaluated once, as SB3 does).
        loss_config = self._loss_config()
        methods = self.method_runtime
        # ERC: the current per-state entropy is needed only for the ERC mask (and the controls
        # and gates that rank states by entropy); with all of them off the update costs what
        # SB3's does (train/entropy then comes from SB3's entropy term).
        track_entropy = self._tracks_entropy and loss_config.needs_entropies
        kl_exact = loss_config.kl_coef != 0 and loss_config.kl_estimator == "exact"
        # ERC: with ERC on and a plain Discrete actor-critic, one fused evaluation gives SB3's
        # outputs and the ERC entropy (with ERC off the update is SB3's, bit for bit).
        fused = track_entropy and self._fused_discrete() and not kl_exact
        # the entropy bonus is SB3's term; an adaptive controller sets its coefficient
        ent_coef = self.ent_coef if methods.entropy is None else methods.entropy.applied_coef

        # ERC: logged values stay tensors until the end of the update, where they are reduced
        # with one host sync (SB3 calls .item() several times per mini-batch).
        log = _UpdateLog()

        continue_training = True
        for epoch in range(self.n_epochs):
            log.start_epoch()
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = self._train_actions(rollout_data.actions)

                new_entropy: th.Tensor | None = None
                old_entropy: th.Tensor | None = None
                entropy: th.Tensor | None
                if fused:
                    values, log_prob, entropy, new_entropy = self._evaluate_discrete(
                        rollout_data.observations, actions
                    )
                elif track_entropy or kl_exact:
                    values, log_prob, entropy, dist = self._evaluate(
                        rollout_data.observations, actions
                    )
                else:  # ERC off: SB3's own call
                    values, log_prob, entropy = self.policy.evaluate_actions(
                        rollout_data.observations, actions
                    )
                values = values.flatten()
                advantages = rollout_data.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

                # ERC: the clipped surrogate (PPO / clip-higher / GPPO, dual-clip, ERC mask) is
                # erc_gym's single policy loss; the ERC entropies come from erc_gym.entropy.
                if track_entropy:
                    if new_entropy is None:
                        new_entropy = state_entropy(dist)
                    old_entropy = rollout_data.old_entropy  # type: ignore[attr-defined]
                kl = None
                if kl_exact:
                    old_logits = rollout_data.old_logits  # type: ignore[attr-defined]
                    kl = kl_from_logits(old_logits, _logits(dist))
                pg = policy_loss(
                    log_prob,
                    rollout_data.old_log_prob,
                    advantages,
                    entropy=new_entropy,
                    old_entropy=old_entropy,
                    config=loss_config,
                    metrics=False,
                    kl=kl,
                    **methods.loss_kwargs(entropy_bonus=False),
                )

                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = rollout_data.old_values + th.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf
                    )
                value_loss = F.mse_loss(rollout_data.returns, values_pred)

                # Approximate the entropy by -log_prob when there is no analytical form (as SB3).
                entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)

                loss = pg.loss + ent_coef * entropy_loss + self.vf_coef * value_loss
                log.add_step(pg.stats, value_loss, entropy_loss)

                if self.target_kl is not None:
                    with th.no_grad():
                        log_ratio = log_prob - rollout_data.old_log_prob
                        approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    if approx_kl_div > 1.5 * self.target_kl:
                        continue_training = False
                        if self.verbose >= 1:
                            print(
                                f"Early stopping at step {epoch} due to reaching max kl: "
                                f"{approx_kl_div:.2f}"
                            )
                        break

                self.policy.optimizer.zero_grad()
                loss.backward()
                # ERC: keep the pre-clipping norm for train/grad_norm.
                log.grad_norms.append(
                    th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                )
                # the equal-step control scales this step's learning rate (else a no-op)
                with methods.scaled_lr(self.policy.optimizer, pg):
                    self.policy.optimizer.step()
                if methods.entropy is not None:
                    methods.after_step(entropy=-float(entropy_loss.detach()))
                    ent_coef = methods.entropy.applied_coef

            self._n_updates += 1
            if not continue_training:
                break

        # ERC: the clip fraction of the off-policy mini-batches (all but the first) is what the
        # adaptive band (if any) steers; it moves for the next update, and the band logged
        # below is the one this update used.
        off_policy = off_policy_clip_fraction(log.stats) if track_entropy else None
        # who ERC clipped in this update (erc_gym.diagnostics.clip_audit): the
        # EntropyDynamicsCallback writes it with its own before / after comparison of the states
        self.clip_audit = (
            clip_audit(log.stats, seed=audit_seed(self.seed or 0, self._n_updates))
            if track_entropy
            else None
        )
        if off_policy is not None:
            self.logger.record("train/erc_clip_fraction_off_policy", off_policy)
        if self.erc_band_control is not None:
            self.erc_band_control.update(off_policy)
        methods.after_update(log.stats)

        explained_var = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )
        sb3_keys, erc_keys = log.reduce(float(clip_range), loss)

        for key, value in sb3_keys.items():
            self.logger.record(f"train/{key}", value)
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
        # ERC: the extra keys.
        for src, dst in _ERC_LOG_KEYS.items():
            if src in erc_keys:
                self.logger.record(f"train/{dst}", erc_keys[src])
        if not track_entropy and "entropy_loss" in sb3_keys:
            self.logger.record("train/entropy", -sb3_keys["entropy_loss"])
        if self._tracks_entropy and not track_entropy:
            old_entropy = self.rollout_buffer.old_entropy  # type: ignore[attr-defined]
            self.logger.record("train/entropy_old", float(np.mean(old_entropy)))
        if "grad_norm" in erc_keys:
            self.logger.record("train/grad_norm", erc_keys["grad_norm"])
        if self.clip_range_high is not None:
            self.logger.record("train/clip_range_high", loss_config.eps_high)
        if loss_config.erc is not None:
            self.logger.record("train/erc_low", loss_config.erc.low)
            self.logger.record("train/erc_high", loss_config.erc.high)
        for key, value in method_metrics(erc_keys).items():
            self.logger.record(f"train/{key}", value)
        if methods.entropy is not None or self.ent_coef != 0:
            # the coefficient of SB3's entropy term in force at the end of the update
            self.logger.record("train/entropy_coef", float(ent_coef))
        # ERC: optimiser steps taken (fewer after a target_kl stop) and the update's wall time
        self.logger.record("train/update_steps", len(log.grad_norms))
        self.logger.record("time/train_seconds", time.perf_counter() - started)

    def learn(
        self: SelfERCPPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "ERCPPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfERCPPO:
        """As :meth:`stable_baselines3.PPO.learn` (TensorBoard runs are named ``ERCPPO_N``)."""
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )


def _logits(dist: Distribution) -> th.Tensor:
    """The (normalised) logits of a ``Discrete`` policy's categorical distribution."""
    if not isinstance(dist, CategoricalDistribution):
        raise ValueError(
            f"the exact KL penalty needs a Categorical distribution, got {type(dist).__name__}"
        )
    logits: th.Tensor = dist.distribution.logits
    return logits


class _UpdateLog:
    """Per-mini-batch tensors of one ``train()`` call, reduced at the end with one host sync.

    Reproduces SB3's logged values: ``policy_gradient_loss``, ``value_loss`` and
    ``entropy_loss`` are means over all mini-batches; ``clip_fraction`` (two-sided,
    ``|r - 1| > clip_range``) is the mean of per-mini-batch fractions; ``approx_kl`` (k3) the mean
    over the last epoch's mini-batches; ``loss`` the last mini-batch's total loss. As in SB3, a
    mini-batch that triggers the ``target_kl`` stop is logged but not trained on.
    """

    def __init__(self) -> None:
        self.stats: list[LossStats] = []
        self.value_losses: list[th.Tensor] = []
        self.entropy_losses: list[th.Tensor] = []
        self.grad_norms: list[th.Tensor] = []
        self.epoch_start = 0

    def start_epoch(self) -> None:
        self.epoch_start = len(self.stats)

    def add_step(self, stats: LossStats, value_loss: th.Tensor, entropy_loss: th.Tensor) -> None:
        self.stats.append(stats)
        self.value_losses.append(value_loss.detach())
        self.entropy_losses.append(entropy_loss.detach())

    def reduce(
        self, clip_range: float, last_loss: th.Tensor
    ) -> tuple[dict[str, float], dict[str, float]]:
        if not self.stats:
            return {}, {}
        with th.no_grad():
            sizes = th.tensor([s.log_ratio.numel() for s in self.stats])
            k = len(self.stats)
            seg = th.repeat_interleave(th.arange(k), sizes).to(self.stats[0].log_ratio.device)
            log_ratio = th.cat([s.log_ratio.reshape(-1) for s in self.stats])
            ratio = th.exp(log_ratio)
            per_step = th.zeros(2, k, dtype=ratio.dtype, device=ratio.device)
            per_step[0].index_add_(0, seg, (th.abs(ratio - 1) > clip_range).to(ratio.dtype))
            per_step[1].index_add_(0, seg, (ratio - 1) - log_ratio)
            per_step = per_step / sizes.to(per_step)
            pg_losses = th.stack([s.loss for s in self.stats])
            parts = {
                "entropy_loss": th.stack(self.entropy_losses).mean(),
                "policy_gradient_loss": pg_losses.mean(),
                "value_loss": th.stack(self.value_losses).mean(),
                "approx_kl": per_step[1, self.epoch_start :].mean(),
                "clip_fraction": per_step[0].mean(),
                "loss": last_loss.detach(),
            }
            if self.grad_norms:
                parts["grad_norm"] = th.stack(self.grad_norms).mean()
            flat = th.stack([v.reshape(()).to(th.float64) for v in parts.values()]).cpu().tolist()
        reduced = dict(zip(parts, flat, strict=True))
        grad_norm = reduced.pop("grad_norm", None)
        erc = loss_metrics(self.stats)
        if grad_norm is not None:
            erc["grad_norm"] = grad_norm
        return reduced, erc
