"""Entropy Ratio Clipping inside a stock verl (>= 0.9.1, < 0.10): policy losses, config and hook.

Install with ``pip install "erc-gym[verl]"``. verl imports this module in every process through
its ``verl.plugins`` entry point (``erc_gym.integrations._verl_plugin``), which registers:

* the policy losses ``erc_dapo`` (PPO / DAPO clip-higher + dual-clip + ERC) and ``erc_gppo``
  (GPPO gradient-preserving clip + dual-clip + ERC), and ERC on DPPO's binary trust regions,
  ``erc_dppo_tv`` / ``erc_dppo_kl`` (truncation ``clip_ratio_c``, no dual-clip). Their per-token
  loss is :func:`erc_gym.losses.policy_loss` (clip variant x ERC mask x token gate); the
  aggregation is verl's own ``agg_loss`` with the actor's ``global_batch_info``, so
  data-parallel and micro-batch normalisation are exactly verl's. Select one with
  ``actor_rollout_ref.actor.policy_loss.loss_mode=erc_dapo``.
* :class:`ERCPolicyLossConfig`, verl's ``PolicyLossConfig`` plus the band ``erc_low`` /
  ``erc_high``, the switch ``erc`` and a token ``gate`` beside ERC -- the methods verl lacks
  (``random_matched``: the matched random control, ERC off; ``random``; ``high_entropy``) and
  verl's own Clip-Cov / KL-Cov combined with ERC (``clip_cov``, ``kl_cov``, read from verl's
  ``clip_cov_*`` / ``kl_cov_ratio`` / ``ppo_kl_coef`` fields) -- selected with the ``_target_``
  override
  ``actor_rollout_ref.actor.policy_loss._target_=erc_gym.integrations.verl.ERCPolicyLossConfig``.

verl's policy-loss signature carries no entropies, so the current and old per-token entropies
reach the loss through a context (:func:`erc_entropies`). :func:`erc_ppo_loss` is the worker
loss function that sets it: it takes the current entropy from the model output (needs
``actor.calculate_entropy=True``) and the old one from the batch key ``entropy``, where verl's
v1 trainer writes the entropy of its old-log-prob pass (``compute_log_prob`` with
``calculate_entropy=True``), and then calls verl's own ``ppo_loss``. Install it on the actor
workers with :func:`install_erc_loss_fn` (verl's ``set_loss_fn`` RPC) or run the trainer mode
``erc_sync`` of :mod:`erc_gym.integrations.verl_trainer`. An ERC loss called without entropies
raises a ``ValueError`` naming the setting; it never trains silently without ERC.

:func:`use_exact_entropy` makes verl's FSDP engine compute the entropy with
:func:`erc_gym.entropy.logprob_and_entropy` (cancellation-free, exact in relative terms at low
entropy) instead of verl's ``logsumexp(z) - sum(p z)``.

Metric keys: the ones verl's ``vanilla`` loss logs, with vanilla's meanings (``actor/pg_clipfrac``:
a PPO/GPPO clip bound took effect; ``actor/ppo_kl``: k1; ``actor/pg_clipfrac_lower``: dual-clip
took effect), plus ERC's own keys (``actor/erc_clip_fraction``, ...; see ``ERC_METRIC_KEYS`` and
``docs/metrics.md``). The ERC kept / clipped fraction is never logged under
``actor/pg_clipfrac_lower`` (the authors' fork did that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, get_args

import torch
from torch import Tensor
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss
from verl.workers.config import PolicyLossConfig

from erc_gym.entropy import logprob_and_entropy
from erc_gym.losses import (
    DPPO_VARIANTS,
    AggregationMode,
    ClipCov,
    ClipVariant,
    ERCConfig,
    HighEntropy,
    KLCov,
    LossConfig,
    LossStats,
    RandomMask,
    TokenGate,
    loss_metrics,
    policy_loss,
)
from erc_gym.methods import method_metrics

__all__ = [
    "ERC_LOSS_MODES",
    "ERC_METRIC_KEYS",
    "OLD_ENTROPY_KEY",
    "ERCPolicyLossConfig",
    "erc_band",
    "erc_entropies",
    "erc_loss_config",
    "erc_ppo_loss",
    "exact_entropy_from_logits",
    "install_erc_loss_fn",
    "use_exact_entropy",
    "verl_metrics",
]

#: Registered loss modes and the clip variant of each.
ERC_LOSS_MODES: dict[str, ClipVariant] = {
    "erc_dapo": "ppo",
    "erc_gppo": "gppo",
    "erc_dppo_tv": "dppo-tv",
    "erc_dppo_kl": "dppo-kl",
}

#: Values of ``ERCPolicyLossConfig.gate``.
GATES = ("random_matched", "random", "high_entropy", "clip_cov", "kl_cov")

#: Batch key under which verl's v1 trainer stores the old policy's per-token entropy
#: (``trainer/ppo/v1/trainer_base.py::_compute_old_log_prob``).
OLD_ENTROPY_KEY = "entropy"

#: erc_gym metric names logged as ``actor/<name>`` beside vanilla's keys.
ERC_METRIC_KEYS = (
    "erc_clip_fraction",
    "erc_clip_fraction_low",
    "erc_clip_fraction_high",
    "entropy_ratio_mean",
    "entropy_ratio_min",
    "entropy_ratio_max",
    "erc_clipped_entropy_old_mean",
    "erc_kept_entropy_old_mean",
    "clip_fraction_low",
    "clip_fraction_high",
)

_SETTING = "actor_rollout_ref.actor.policy_loss"

_ENTROPIES: ContextVar[tuple[Tensor, Tensor] | None] = ContextVar(
    "erc_gym_verl_entropies", default=None
)


def erc_band(low: Any, high: Any) -> ERCConfig:
    """The :class:`~erc_gym.losses.ERCConfig` of verl settings ``erc_low`` / ``erc_high``.

    Raises:
        ValueError: naming ``actor_rollout_ref.actor.policy_loss.erc_low/erc_high`` unless
            ``0 <= low < 1 < high``.
    """
    try:
        return ERCConfig(float(low), float(high))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{_SETTING}.erc_low={low!r} / {_SETTING}.erc_high={high!r}: the ERC band must satisfy "
            f"0 <= erc_low < 1 < erc_high (the paper's band is 0.95 / 1.05); {exc}"
        ) from None


@dataclass
class ERCPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` with the ERC band.

    Select it with ``actor_rollout_ref.actor.policy_loss._target_=`` this class's path and set
    ``loss_mode`` to ``erc_dapo`` or ``erc_gppo``. The clip range and dual-clip come from the
    actor's ``clip_ratio_low``, ``clip_ratio_high`` and ``clip_ratio_c``, as for ``vanilla``.

    Args:
        loss_mode: ``"erc_dapo"`` (default), ``"erc_gppo"``, ``"erc_dppo_tv"`` or
            ``"erc_dppo_kl"``; other verl modes ignore these fields.
        erc_low: lower bound of ``rho = H_new / H_old`` (strict); the paper uses 0.95 (the
            authors' fork's yaml default ``entropy_mask_low`` is 0.8).
        erc_high: upper bound (strict); the paper uses 1.05.
        erc: apply the band (False: ERC off; ``gate="random_matched"`` still imitates it).
        gate: a token gate beside ERC, or None: ``"random_matched"`` (stop the gradient of as
            many random tokens as the band would, per micro-batch; needs ``erc=False``),
            ``"random"`` (a fixed share, ``random_share``), ``"high_entropy"`` (keep the top
            ``entropy_quantile`` by current entropy, per micro-batch), ``"clip_cov"`` /
            ``"kl_cov"`` (verl's ``clip_cov_*`` / ``kl_cov_ratio``, ``ppo_kl_coef`` fields).
            Random draws use torch's global RNG, as verl's ``clip_cov`` does.
        random_share: the share of valid tokens of ``gate="random"``.
        entropy_quantile: the share of tokens ``gate="high_entropy"`` keeps.

    Raises:
        ValueError: unless ``0 <= erc_low < 1 < erc_high``, or on a bad gate setting.
    """

    loss_mode: str = "erc_dapo"
    erc_low: float = 0.95
    erc_high: float = 1.05
    erc: bool = True
    gate: str | None = None
    random_share: float = 0.2
    entropy_quantile: float = 0.2

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        erc_band(self.erc_low, self.erc_high)
        _gate(self, erc_band(self.erc_low, self.erc_high), bool(self.erc))


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for verl's dataclass configs, OmegaConf nodes and dicts alike."""
    getter = getattr(config, "get", None)
    return getter(key, default) if callable(getter) else getattr(config, key, default)


def _gate(loss_cfg: Any, band: ERCConfig, erc_on: bool) -> TokenGate | None:
    """The token gate of an ``ERCPolicyLossConfig`` (None without one)."""
    name = _get(loss_cfg, "gate")
    where = f"{_SETTING}.gate"
    if name is None:
        return None
    if name not in GATES:
        raise ValueError(f"{where} must be one of {GATES} or None, got {name!r}")
    try:
        if name == "random_matched":
            if erc_on:
                raise ValueError(
                    f"{where}='random_matched' is the control of ERC and replaces it: set "
                    f"{_SETTING}.erc=False (the band erc_low / erc_high is what it imitates)"
                )
            return RandomMask(match=band)
        if name == "random":
            return RandomMask(share=float(_get(loss_cfg, "random_share", 0.2)))
        if name == "high_entropy":
            return HighEntropy(float(_get(loss_cfg, "entropy_quantile", 0.2)))
        if name == "clip_cov":
            return ClipCov(
                float(_get(loss_cfg, "clip_cov_ratio", 2e-4)),
                float(_get(loss_cfg, "clip_cov_lb", 1.0)),
                float(_get(loss_cfg, "clip_cov_ub", 5.0)),
            )
        return KLCov(
            float(_get(loss_cfg, "kl_cov_ratio", 2e-4)), float(_get(loss_cfg, "ppo_kl_coef", 0.1))
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}={name!r}: {exc}") from None


def erc_loss_config(
    config: Any, clip: ClipVariant, loss_agg_mode: str = "token-mean"
) -> LossConfig:
    """The erc_gym :class:`~erc_gym.losses.LossConfig` equivalent to a verl actor config.

    ``eps_low`` / ``eps_high`` are ``clip_ratio_low`` / ``clip_ratio_high`` (``clip_ratio`` where
    those are None), ``dual_clip_c`` is ``clip_ratio_c`` (verl always dual-clips; default 3.0;
    for DPPO it is the weight truncation ``ratio_cap`` instead, as in verl's ``dppo_*``), the
    band is ``policy_loss.erc_low`` / ``erc_high`` (applied unless ``policy_loss.erc`` is False)
    and the token gate ``policy_loss.gate``.

    Args:
        config: verl ``ActorConfig`` (or a dict-like with the same keys).
        clip: ``"ppo"`` or ``"gppo"``.
        loss_agg_mode: verl's mode; modes erc_gym lacks (``token-sum``) map to ``token-mean``,
            which is never used for the loss (verl's ``agg_loss`` aggregates).

    Raises:
        ValueError: if the band is missing or invalid.
    """
    clip_ratio = _get(config, "clip_ratio", 0.2)
    eps_low = _get(config, "clip_ratio_low")
    eps_high = _get(config, "clip_ratio_high")
    loss_cfg = _get(config, "policy_loss", {})
    low, high = _get(loss_cfg, "erc_low"), _get(loss_cfg, "erc_high")
    if low is None or high is None:
        raise ValueError(
            f"{_SETTING}.loss_mode={_get(loss_cfg, 'loss_mode')!r} needs the ERC band: set "
            f"{_SETTING}._target_=erc_gym.integrations.verl.ERCPolicyLossConfig (band 0.95 / 1.05 "
            f"by default) or {_SETTING}.erc_low and .erc_high"
        )
    aggregation = loss_agg_mode if loss_agg_mode in get_args(AggregationMode) else "token-mean"
    band = erc_band(low, high)
    erc_on = bool(_get(loss_cfg, "erc", True))
    clip_c = float(_get(config, "clip_ratio_c", 3.0))
    dppo = clip in DPPO_VARIANTS
    return LossConfig(
        clip=clip,
        eps_low=float(clip_ratio if eps_low is None else eps_low),
        eps_high=float(clip_ratio if eps_high is None else eps_high),
        dual_clip_c=None if dppo else clip_c,
        ratio_cap=clip_c if dppo else None,
        erc=band if erc_on else None,
        gate=_gate(loss_cfg, band, erc_on),
        aggregation=aggregation,  # type: ignore[arg-type]
    )


@contextmanager
def erc_entropies(entropy: Tensor, old_entropy: Tensor) -> Iterator[None]:
    """Hand the current and old per-token entropies ``(B, T)`` to the ERC losses called inside.

    :func:`erc_ppo_loss` uses it around verl's ``ppo_loss``; call a registered ERC loss directly
    (``get_policy_loss_fn("erc_dapo")(...)``) inside it.
    """
    token = _ENTROPIES.set((entropy, old_entropy))
    try:
        yield
    finally:
        _ENTROPIES.reset(token)


def verl_metrics(stats: LossStats) -> dict[str, float]:
    """verl metric dict of one ERC loss call: vanilla's keys (same meanings) plus ERC's."""
    m = loss_metrics([stats])
    out = {
        "actor/pg_clipfrac": m["clip_fraction"],
        "actor/ppo_kl": m["ppo_kl"],
        "actor/pg_clipfrac_lower": m["dual_clip_fraction"],
    }
    out.update({f"actor/{key}": m[key] for key in ERC_METRIC_KEYS if key in m})
    out.update({f"actor/{key}": value for key, value in method_metrics(m).items()})
    return out


def _erc_policy_loss(
    mode: str,
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    if config is None:
        raise ValueError(f"policy loss {mode!r} needs the actor config (config=None)")
    loss_config = erc_loss_config(config, ERC_LOSS_MODES[mode], loss_agg_mode)
    entropies = _ENTROPIES.get()
    if entropies is None and loss_config.needs_entropies:
        raise ValueError(
            f"{_SETTING}.loss_mode={mode!r} got no entropies: ERC needs the current and old "
            "per-token entropies. Set actor_rollout_ref.actor.calculate_entropy=True and train "
            "with the erc_gym loss function (trainer.v1.trainer_mode=erc_sync, or "
            "erc_gym.integrations.verl.install_erc_loss_fn); when calling the loss yourself, wrap "
            "the call in erc_gym.integrations.verl.erc_entropies(entropy, old_entropy)"
        )
    entropy, old_entropy = entropies if entropies is not None else (None, None)
    out = policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        entropy=entropy,
        old_entropy=old_entropy,
        mask=response_mask,
        config=loss_config,
        metrics=False,
    )
    token_loss = out.token_loss
    if rollout_is_weights is not None:
        # The weights carry no gradient, so weighting after the stop-gradient equals weighting
        # before it (vanilla weights the clipped loss the same way).
        token_loss = token_loss * rollout_is_weights
    global_batch_info = _get(config, "global_batch_info", None) or {}
    loss = agg_loss(
        loss_mat=token_loss,
        loss_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        **global_batch_info,
    )
    return loss, dict(verl_metrics(out.stats))


#: The registered losses (verl's ``PolicyLossFn`` signature, the mode bound first).
compute_policy_loss_erc_dapo = register_policy_loss("erc_dapo")(
    partial(_erc_policy_loss, "erc_dapo")
)
compute_policy_loss_erc_gppo = register_policy_loss("erc_gppo")(
    partial(_erc_policy_loss, "erc_gppo")
)
compute_policy_loss_erc_dppo_tv = register_policy_loss("erc_dppo_tv")(
    partial(_erc_policy_loss, "erc_dppo_tv")
)
compute_policy_loss_erc_dppo_kl = register_policy_loss("erc_dppo_kl")(
    partial(_erc_policy_loss, "erc_dppo_kl")
)


def _padded_old_entropy(data: Any) -> Tensor:
    old = data.select(OLD_ENTROPY_KEY).to_padded_tensor()[OLD_ENTROPY_KEY]
    return old


def erc_ppo_loss(
    config: Any, model_output: Mapping[str, Any], data: Any, dp_group: Any = None
) -> tuple[Tensor, dict[str, Any]]:
    """verl worker loss function: verl's ``ppo_loss`` with the entropies handed to ERC.

    Same signature as ``verl.workers.utils.losses.ppo_loss`` (bind ``config`` with
    ``functools.partial``). For a non-ERC ``loss_mode`` it is ``ppo_loss`` unchanged.

    Args:
        config: the actor's ``ActorConfig``.
        model_output: the engine's output; ``entropy`` (current, no-padding layout) is required
            for ERC and present when ``actor.calculate_entropy=True``.
        data: the micro-batch ``TensorDict``; ``entropy`` (old policy, from the old-log-prob
            pass) is required for ERC.
        dp_group: passed through.

    Returns:
        ``(loss, metrics)`` of verl's ``ppo_loss``.

    Raises:
        ValueError: naming ``actor.calculate_entropy`` when the current entropy is missing, or
            the old-log-prob pass when the old entropy is missing.
    """
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    mode = _get(_get(config, "policy_loss", {}), "loss_mode", "vanilla")
    if (
        mode not in ERC_LOSS_MODES
        or not erc_loss_config(config, ERC_LOSS_MODES[mode]).needs_entropies
    ):
        return ppo_loss(config, model_output, data, dp_group)
    entropy = model_output.get("entropy", None)
    if entropy is None:
        raise ValueError(
            f"{_SETTING}.loss_mode={mode!r} needs the current entropy: set "
            f"actor_rollout_ref.actor.calculate_entropy=True (got calculate_entropy="
            f"{_get(config, 'calculate_entropy')!r})"
        )
    if OLD_ENTROPY_KEY not in data.keys():  # noqa: SIM118 (TensorDict rejects `in` itself)
        raise ValueError(
            f"{_SETTING}.loss_mode={mode!r} needs the old policy's entropy in the batch key "
            f"{OLD_ENTROPY_KEY!r}, from the old-log-prob pass (compute_log_prob with "
            "calculate_entropy=True, as verl's v1 trainer runs it); it is missing, e.g. with "
            "algorithm.rollout_correction.bypass_mode=True, which skips that pass"
        )
    current = no_padding_2_padding(entropy, data)
    old = _padded_old_entropy(data)
    with erc_entropies(current, old):
        return ppo_loss(config, model_output, data, dp_group)


def install_erc_loss_fn(actor_worker_group: Any, actor_config: Any) -> Callable[..., Any]:
    """Install :func:`erc_ppo_loss` on verl's actor workers through their ``set_loss_fn`` RPC.

    Args:
        actor_worker_group: the trainer's ``actor_rollout_wg``.
        actor_config: the actor's ``ActorConfig`` (``omega_conf_to_dataclass`` of
            ``actor_rollout_ref.actor``).

    Returns:
        The installed loss function.

    Raises:
        ValueError: if ``actor.calculate_entropy`` is off for an ERC loss mode.
    """
    mode = _get(_get(actor_config, "policy_loss", {}), "loss_mode", "vanilla")
    if mode in ERC_LOSS_MODES:
        # fails at start-up on a bad band or gate
        needs = erc_loss_config(actor_config, ERC_LOSS_MODES[mode]).needs_entropies
        if needs and not _get(actor_config, "calculate_entropy", False):
            raise ValueError(
                f"{_SETTING}.loss_mode={mode!r} needs actor_rollout_ref.actor.calculate_entropy="
                "True (the current entropy of each training forward pass), got False"
            )
    loss_fn = partial(erc_ppo_loss, config=actor_config)
    actor_worker_group.set_loss_fn(loss_fn)
    return loss_fn


def exact_entropy_from_logits(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """verl-compatible ``entropy_from_logits`` computed by :mod:`erc_gym.entropy`.

    Args:
        logits: ``(..., V)`` logits (verl divides them by the temperature first).
        chunk_size: rows per chunk (verl's ``entropy_from_logits_chunk_size``); None lets
            erc_gym bound the memory itself.

    Returns:
        fp32 entropies of shape ``logits.shape[:-1]``, differentiable when ``logits`` requires
        grad (verl adds an entropy bonus when ``entropy_coeff != 0``).
    """
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = logprob_and_entropy(
        logits, labels, chunk_size=chunk_size, entropy_grad=logits.requires_grad
    )
    return entropy


def use_exact_entropy() -> None:
    """Make verl compute every entropy in this process with :func:`exact_entropy_from_logits`.

    verl's FSDP engine picks its entropy function when it is built, from
    ``verl.utils.torch_functional.entropy_from_logits`` (or ``..._with_chunking``), whose
    ``logsumexp(z) - sum(p z)`` loses most of its digits at low entropy (docs/scale_out.md has
    the measured errors). This replaces both module functions, so engines built afterwards use
    erc_gym's cancellation-free entropy for H_old (old-log-prob pass) and H_new (training pass)
    alike. The plugin calls it in every verl process when the environment variable
    ``ERC_GYM_VERL_ENTROPY=exact`` is set (pass it to the Ray workers with
    ``+ray_kwargs.ray_init.runtime_env.env_vars.ERC_GYM_VERL_ENTROPY=exact``).
    """
    import verl.utils.torch_functional as verl_f

    verl_f.entropy_from_logits = exact_entropy_from_logits
    verl_f.entropy_from_logits_with_chunking = exact_entropy_from_logits
