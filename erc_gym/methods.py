"""The rival methods, baselines and controls as flat trainer settings (``docs/rivals.md``).

Every trainer takes the methods through its existing configuration: :class:`MethodSettings` is a
base of :class:`~erc_gym.bandit.BanditConfig` and :class:`~erc_gym.llm.TrainerConfig` (so each
field is also an ``erc-gym llm`` flag), and :class:`~erc_gym.sb3.ERCPPO` takes the same names as
keyword arguments (``ent_coef``, ``target_kl`` and ``clip_variant`` being SB3's / ERCPPO's own).
:meth:`MethodSettings.apply_to` turns them into the one :class:`~erc_gym.losses.LossConfig`;
the trainer-side parts (the adaptive coefficients' controllers, the equal-step learning-rate
scale, ``target_kl`` early stopping) are read by the trainers. The registry of method names is
:data:`erc_gym.losses.METHODS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from erc_gym.adaptive_coef import AdaptiveEntropyCoef, AdaptiveKLCoef
from erc_gym.losses import (
    DPPO_VARIANTS,
    GATE_METRICS,
    METHOD_METRIC_KEYS,
    ClipCov,
    ClipVariant,
    ERCConfig,
    HighEntropy,
    KLCov,
    KLEstimator,
    LossConfig,
    LossOutput,
    LossStats,
    RandomMask,
    TokenGate,
    loss_metrics,
)

__all__ = [
    "CLIP_VARIANTS",
    "MethodRuntime",
    "MethodSettings",
    "acted_on_metric",
    "approx_kl",
    "check_target_kl",
    "early_stop",
    "method_defaults",
    "method_metrics",
]

#: Added to the run's seed for the token gates' random generator, so the draws neither reuse nor
#: shift the stream that samples the data (runs of different methods with one seed share data).
GATE_SEED_OFFSET = 0x5EED

#: Values of the ``clip_variant`` setting.
CLIP_VARIANTS: tuple[ClipVariant, ...] = ("ppo", "gppo", "none", "dppo-tv", "dppo-kl")


def _number(name: str, value: Any, *, low: float, strict: bool, high: float = math.inf) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not ((value > low if strict else value >= low) and value <= high):
        bound = f"> {low}" if strict else f">= {low}"
        upper = "" if high == math.inf else f" and <= {high}"
        raise ValueError(f"{name} must be a finite number {bound}{upper}, got {name}={value!r}")


def check_target_kl(target_kl: float | None) -> None:
    """Raise ``ValueError`` unless ``target_kl`` is None or a finite number > 0."""
    if target_kl is not None:
        _number("target_kl", target_kl, low=0.0, strict=True)


def early_stop(approx_kl: float, target_kl: float | None) -> bool:
    """SB3's ``target_kl`` rule: stop the update when ``approx_kl > 1.5 * target_kl``.

    ``approx_kl`` is SB3's k3 estimate ``mean((r - 1) - log r)`` of the mini-batch about to be
    trained on, measured before its step; that step and the rest of the update are skipped.
    """
    return target_kl is not None and approx_kl > 1.5 * target_kl


@dataclass
class MethodSettings:
    """Settings of the rival methods, baselines and controls, shared by every trainer.

    All defaults are "off". The token gates (random mask, Clip-Cov, KL-Cov, high-entropy) are
    one axis: at most one is on.
    """

    clip_variant: str | None = None
    """Replaces the recipe's clip: ``ppo``, ``gppo``, ``none`` (unclipped ``-A r`` without
    dual-clip, KL-Cov's base) or DPPO's binary trust region ``dppo-tv`` / ``dppo-kl`` (the
    recipe's eps become the divergence thresholds; no dual-clip). None: the recipe's."""
    ratio_cap: float = 20.0
    """DPPO only: truncation C of its importance weight min(r, C) (verl's clip_ratio_c; its
    DPPO comment advises a large value)."""
    control_low: float | None = None
    """Lower bound of the ERC band that the controls imitate without applying it (with
    control_high): random_mask_matched masks as many tokens as it would, equal_step scales the
    step by the share it would keep."""
    control_high: float | None = None
    """Upper bound of the controls' ERC band."""
    random_mask_matched: bool = False
    """The matched random control (ERC off): in every mini-batch, stop the gradient of exactly as
    many valid tokens as the control band would, drawn at random (seeded by the run's seed)."""
    random_mask_share: float | None = None
    """A random stop-gradient of this fixed share of the valid tokens of each mini-batch."""
    equal_step: bool = False
    """The equal-step control (ERC off): multiply each mini-batch's learning rate by the share
    of valid tokens the control band would keep (Adam makes scaling the loss nearly a no-op)."""
    clip_cov_ratio: float | None = None
    """Clip-Cov (arXiv 2505.22617): share of the valid tokens, drawn among those with centred
    covariance in (clip_cov_lb, clip_cov_ub), whose loss is zeroed. verl's default 2e-4 acts on
    one token below 5,000 tokens: choose it per scale. None: off."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower covariance bound of the candidates."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper covariance bound of the candidates."""
    kl_cov_ratio: float | None = None
    """KL-Cov (arXiv 2505.22617): share of the valid tokens with the largest centred covariance
    that get ``kl_cov_coef * abs(logp - logp_old)`` added. None: off."""
    kl_cov_coef: float = 0.1
    """KL-Cov: weight of the penalty (verl's ppo_kl_coef)."""
    top_entropy_quantile: float = 1.0
    """Train only on the top share of tokens by current entropy (arXiv 2506.01939; TRL's rule):
    rho in [0, 1], 1 = off; the paper uses 0.2."""
    ent_coef: float = 0.0
    """Entropy bonus: loss -= ent_coef * mean token entropy (with entropy_target: the starting
    coefficient)."""
    entropy_target: float | None = None
    """Adaptive entropy coefficient (Skywork-OR1, TRL's use_adaptive_entropy): after every
    optimiser step the coefficient moves by entropy_coef_delta toward keeping the mean entropy
    above this target (nats), and is applied only while the entropy is at or below it."""
    entropy_coef_delta: float = 0.005
    """Adaptive entropy: step of the coefficient per optimiser step."""
    entropy_coef_min: float = 0.0
    """Adaptive entropy: smallest coefficient."""
    entropy_coef_max: float = 1.0
    """Adaptive entropy: largest coefficient."""
    kl_coef: float = 0.0
    """KL penalty to the old policy: loss += kl_coef * mean KL(pi_old || pi) per state (exact
    where the trainer has the full distributions; with kl_target: the starting coefficient)."""
    kl_target: float | None = None
    """Adaptive KL penalty (PPO, arXiv 1707.06347): after each update, halve kl_coef when the
    update's mean KL is below kl_target / 1.5, double it when above kl_target * 1.5."""
    target_kl: float | None = None
    """Early stop (SB3's rule): end the update's epochs at the first mini-batch whose k3 KL
    estimate exceeds 1.5 * target_kl (that mini-batch is not trained on). None: off."""

    # ------------------------------------------------------------------ checks

    def check_methods(self, erc_on: bool) -> None:
        """Raise ``ValueError`` (naming the setting) on a bad or contradictory setting.

        Args:
            erc_on: whether the trainer's ERC band is set.
        """
        for name in ("random_mask_matched", "equal_step"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"{name} must be true or false, got {name}={getattr(self, name)!r}"
                )
        if self.clip_variant is not None and self.clip_variant not in CLIP_VARIANTS:
            raise ValueError(
                f"clip_variant must be one of {CLIP_VARIANTS} or None (the recipe's), got "
                f"clip_variant={self.clip_variant!r}"
            )
        _number("ratio_cap", self.ratio_cap, low=0.0, strict=True)
        if (self.control_low is None) != (self.control_high is None):
            raise ValueError(
                "control_low and control_high must both be set or both be None, got "
                f"control_low={self.control_low!r}, control_high={self.control_high!r}"
            )
        controls = [n for n in ("random_mask_matched", "equal_step") if getattr(self, n)]
        if controls and self.control_low is None:
            raise ValueError(
                f"{controls[0]}=True imitates an ERC band: set control_low and control_high "
                "(e.g. 0.95 and 1.05)"
            )
        if controls and erc_on:
            raise ValueError(
                f"{controls[0]}=True is a control of ERC and runs with ERC off: set erc_low and "
                "erc_high to None (the band goes to control_low / control_high)"
            )
        if self.control_low is not None and not controls:
            raise ValueError(
                "control_low / control_high are read only by random_mask_matched or "
                "equal_step; set one of them, or remove the control band"
            )
        for name in ("clip_cov_ratio", "kl_cov_ratio", "random_mask_share"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), low=0.0, strict=True, high=1.0)
        _number("top_entropy_quantile", self.top_entropy_quantile, low=0.0, strict=False, high=1.0)
        gates = [
            name
            for name, on in (
                ("random_mask_matched", self.random_mask_matched),
                ("random_mask_share", self.random_mask_share is not None),
                ("clip_cov_ratio", self.clip_cov_ratio is not None),
                ("kl_cov_ratio", self.kl_cov_ratio is not None),
                ("top_entropy_quantile", self.top_entropy_quantile < 1.0),
            )
            if on
        ]
        if len(gates) > 1:
            raise ValueError(
                f"at most one token gate can be on, got {' and '.join(gates)}: the random mask, "
                "Clip-Cov, KL-Cov and high-entropy gates are alternatives"
            )
        for name in ("ent_coef", "kl_coef", "entropy_coef_min", "kl_cov_coef"):
            _number(name, getattr(self, name), low=0.0, strict=False)
        _number("entropy_coef_max", self.entropy_coef_max, low=self.entropy_coef_min, strict=False)
        _number("entropy_coef_delta", self.entropy_coef_delta, low=0.0, strict=True)
        for name in ("clip_cov_lb", "clip_cov_ub"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                raise ValueError(f"{name} must be a number, got {name}={value!r}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_lb must be below clip_cov_ub, got clip_cov_lb={self.clip_cov_lb}, "
                f"clip_cov_ub={self.clip_cov_ub}"
            )
        if self.entropy_target is not None:
            _number("entropy_target", self.entropy_target, low=0.0, strict=True)
        if self.kl_target is not None:
            _number("kl_target", self.kl_target, low=0.0, strict=True)
            if self.kl_coef <= 0:
                raise ValueError(
                    f"kl_target={self.kl_target} adapts kl_coef, which needs a start value > 0 "
                    f"(e.g. kl_coef=1.0), got kl_coef={self.kl_coef}"
                )
        check_target_kl(self.target_kl)

    # ------------------------------------------------------------------ the loss

    def control_band(self) -> ERCConfig | None:
        """The controls' ERC band, or None."""
        if self.control_low is None or self.control_high is None:
            return None
        return ERCConfig(float(self.control_low), float(self.control_high))

    def token_gate(self) -> TokenGate | None:
        """The :data:`~erc_gym.losses.TokenGate` these settings turn on, or None."""
        if self.random_mask_matched:
            return RandomMask(match=self.control_band())
        if self.random_mask_share is not None:
            return RandomMask(share=float(self.random_mask_share))
        if self.clip_cov_ratio is not None:
            return ClipCov(float(self.clip_cov_ratio), self.clip_cov_lb, self.clip_cov_ub)
        if self.kl_cov_ratio is not None:
            return KLCov(float(self.kl_cov_ratio), self.kl_cov_coef)
        if self.top_entropy_quantile < 1.0:
            return HighEntropy(float(self.top_entropy_quantile))
        return None

    def apply_to(
        self, base: LossConfig, *, kl_estimator: KLEstimator = "exact", entropy_bonus: bool = True
    ) -> LossConfig:
        """``base`` (a recipe, with or without ERC) with these methods applied.

        Args:
            base: the recipe's :class:`~erc_gym.losses.LossConfig`.
            kl_estimator: ``"exact"`` when the trainer passes the per-state KL, else ``"k3"``.
            entropy_bonus: put ``ent_coef`` into the loss (False for ERCPPO, whose bonus is
                SB3's own term).

        Raises:
            ValueError: on a combination the loss does not define (naming it).
        """
        self.check_methods(base.erc is not None)
        clip = base.clip if self.clip_variant is None else self.clip_variant
        dppo = clip in DPPO_VARIANTS
        return dataclasses.replace(
            base,
            clip=clip,  # type: ignore[arg-type]
            # DPPO truncates its weight instead; "none" is no clip at all (verl's KL-Cov base)
            dual_clip_c=None if dppo or clip == "none" else base.dual_clip_c,
            ratio_cap=float(self.ratio_cap) if dppo else None,
            gate=self.token_gate(),
            entropy_coef=float(self.ent_coef) if entropy_bonus else 0.0,
            kl_coef=float(self.kl_coef),
            kl_estimator=kl_estimator,
            equal_step=self.control_band() if self.equal_step else None,
        )

    # ------------------------------------------------------------------ trainer-side parts

    def entropy_controller(self) -> AdaptiveEntropyCoef | None:
        """The adaptive entropy coefficient's controller, or None (fixed coefficient)."""
        if self.entropy_target is None:
            return None
        return AdaptiveEntropyCoef(
            target=float(self.entropy_target),
            coef=float(self.ent_coef),
            delta=float(self.entropy_coef_delta),
            coef_min=float(self.entropy_coef_min),
            coef_max=float(self.entropy_coef_max),
        )

    def kl_controller(self) -> AdaptiveKLCoef | None:
        """The adaptive KL coefficient's controller, or None (fixed coefficient)."""
        if self.kl_target is None:
            return None
        return AdaptiveKLCoef(target=float(self.kl_target), coef=float(self.kl_coef))

    @property
    def needs_entropy_grad(self) -> bool:
        """Whether the loss needs a differentiable current entropy (an entropy bonus is on)."""
        return self.ent_coef != 0 or self.entropy_target is not None

    @property
    def needs_kl(self) -> bool:
        """Whether a KL penalty is on (the trainer computes the per-state KL)."""
        return self.kl_coef != 0

    def method_fields(self) -> dict[str, Any]:
        """These settings as a plain dict (field name -> value)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(MethodSettings)}


def acted_on_metric(settings: Mapping[str, Any], erc_on: bool) -> str:
    """The metric that says how much a run's method acted (``docs/rivals.md``'s registry table).

    A share of tokens for the token gates and ERC (``erc_clip_fraction``,
    ``random_mask_fraction``, ``clip_cov_fraction``, ``kl_cov_fraction``,
    ``entropy_gate_fraction``), the kept share for the equal-step control
    (``equal_step_scale``), the optimiser steps taken for ``target_kl`` (``update_steps``), the
    coefficient or the KL for the regularisers (``entropy_coef``, ``kl_coef`` when adaptive, else
    ``kl_mean``), and PPO's / DPPO's ``clip_fraction`` otherwise.

    Args:
        settings: the run's flat trainer settings (keys other than :class:`MethodSettings`
            fields are ignored; a missing field has its default).
        erc_on: whether the run's ERC band is set.
    """
    m = MethodSettings(**{k: v for k, v in settings.items() if k in _FIELDS})
    gate = m.token_gate()
    if erc_on:
        return "erc_clip_fraction"
    if m.equal_step:
        return "equal_step_scale"
    if gate is not None:
        return GATE_METRICS[type(gate)]
    if m.target_kl is not None:
        return "update_steps"
    if m.entropy_target is not None or m.ent_coef != 0:
        return "entropy_coef"
    if m.kl_coef != 0:
        return "kl_coef" if m.kl_target is not None else "kl_mean"
    return "clip_fraction"


def method_defaults() -> dict[str, Any]:
    """Every :class:`MethodSettings` field with its default (all methods off)."""
    return MethodSettings().method_fields()


_FIELDS = frozenset(f.name for f in dataclasses.fields(MethodSettings))


def approx_kl(stats: LossStats) -> float:
    """SB3's k3 estimate ``mean((r - 1) - log r)`` over the valid tokens of one loss call."""
    with torch.no_grad():
        log_ratio = stats.log_ratio
        k3 = torch.expm1(log_ratio) - log_ratio
        if stats.valid is None:
            return float(k3.mean())
        return float(torch.where(stats.valid, k3, 0.0).sum() / stats.valid.sum().clamp(min=1))


class MethodRuntime:
    """A trainer's run-time state of the methods: adaptive coefficients, random draws, early
    stop and the equal-step learning-rate scale, shared by every trainer.

    Args:
        settings: the run's :class:`MethodSettings`.
        seed: the run's seed (the token gates' generator is seeded from it).
        device: device of the token gates' generator (where the loss's tensors live).

    Attributes:
        entropy: the adaptive entropy coefficient's controller, or None.
        kl: the adaptive KL coefficient's controller, or None.
        generator: the token gates' random source.
        stopped: whether the last update stopped early on ``target_kl``.
    """

    def __init__(
        self, settings: MethodSettings, seed: int, device: torch.device | str = "cpu"
    ) -> None:
        self.settings = settings
        self.entropy = settings.entropy_controller()
        self.kl = settings.kl_controller()
        self.generator = torch.Generator(device=device).manual_seed(int(seed) + GATE_SEED_OFFSET)
        self.stopped = False

    def loss_kwargs(self, entropy_bonus: bool = True) -> dict[str, Any]:
        """Keyword arguments of this step's :func:`~erc_gym.losses.policy_loss` call.

        Args:
            entropy_bonus: the loss carries the entropy bonus (False: the trainer's own term,
                ERCPPO's SB3 ``ent_coef``, takes :attr:`entropy`'s coefficient).
        """
        kwargs: dict[str, Any] = {"generator": self.generator}
        if self.entropy is not None and entropy_bonus:
            kwargs["entropy_coef"] = self.entropy.applied_coef
        if self.kl is not None:
            kwargs["kl_coef"] = self.kl.coef
        return kwargs

    def should_stop(self, stats: LossStats) -> bool:
        """SB3's ``target_kl`` rule on the mini-batch about to be trained on (one host sync).

        Sets :attr:`stopped`; the caller skips this step and ends the update.
        """
        target = self.settings.target_kl
        self.stopped = target is not None and early_stop(approx_kl(stats), target)
        return self.stopped

    @contextmanager
    def scaled_lr(self, optimizer: torch.optim.Optimizer, out: LossOutput) -> Iterator[None]:
        """Around ``optimizer.step()``: the equal-step control's learning rate for this step.

        Multiplies every parameter group's learning rate by
        :attr:`erc_gym.losses.LossOutput.step_scale` (one
        host sync) and restores it afterwards, before any scheduler step.
        """
        if out.step_scale is None:
            yield
            return
        scale = float(out.step_scale)
        saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * scale
        try:
            yield
        finally:
            for group, lr in zip(optimizer.param_groups, saved, strict=True):
                group["lr"] = lr

    def after_step(self, out: LossOutput | None = None, entropy: float | None = None) -> None:
        """After an optimiser step: the adaptive entropy coefficient reads the step's entropy.

        Args:
            out: the step's loss output (its ``bonus_entropy``), or None.
            entropy: the step's mean entropy when the bonus is not the loss's (ERCPPO's SB3 term).
        """
        if self.entropy is None:
            return
        if entropy is None and out is not None and out.bonus_entropy is not None:
            entropy = float(out.bonus_entropy)
        if entropy is not None:
            self.entropy.update(entropy)

    def after_update(self, stats: Sequence[LossStats]) -> None:
        """After an update (rollout): the adaptive KL coefficient reads the update's mean KL
        (the per-token KL the penalty saw over the update's mini-batches)."""
        if self.kl is not None and stats:
            self.kl.update(loss_metrics(stats).get("kl_mean"))

    def state_dict(self) -> dict[str, Any]:
        """Controllers and generator state (for checkpoints: a resumed run continues exactly)."""
        return {
            "entropy": None if self.entropy is None else self.entropy.state_dict(),
            "kl": None if self.kl is None else self.kl.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.entropy is not None and state.get("entropy") is not None:
            self.entropy.load_state_dict(state["entropy"])
        if self.kl is not None and state.get("kl") is not None:
            self.kl.load_state_dict(state["kl"])
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])


def method_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The rival methods' keys of a :func:`~erc_gym.losses.loss_metrics` dict."""
    return {k: v for k, v in metrics.items() if k in METHOD_METRIC_KEYS}
