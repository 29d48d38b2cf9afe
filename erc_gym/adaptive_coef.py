"""Adaptive regulariser coefficients: the entropy bonus (Skywork-OR1) and the KL penalty (PPO).

Two small controllers that trainers update between optimiser steps and pass to
:func:`erc_gym.losses.policy_loss` as ``entropy_coef=`` / ``kl_coef=``. The loss itself stays
stateless; the trainers checkpoint each controller's ``state_dict()`` so a resumed run
continues exactly.

* :class:`AdaptiveEntropyCoef` -- the rule of Skywork-OR1 (He et al. 2025, arXiv 2505.22312) as
  TRL 1.16 implements it (``GRPOConfig.use_adaptive_entropy``): after each optimiser step the
  step's mean token entropy ``H`` is compared with ``target``; ``coef += delta`` (up to
  ``coef_max``) when ``H <= target``, else ``coef -= delta`` (down to ``coef_min``). The bonus is
  *applied* only while the previous step's entropy was at or below the target, so a policy whose
  entropy is healthy trains without it. ``tests/integrations/test_trl.py`` checks the sequence of
  coefficients against TRL's own trainer.
* :class:`AdaptiveKLCoef` -- PPO's adaptive KL penalty (Schulman et al. 2017, arXiv 1707.06347,
  section 4): after each update (rollout), with ``d`` the mean KL(old || new), ``coef /= factor``
  when ``d < target / tolerance`` and ``coef *= factor`` when ``d > target * tolerance``
  (the paper: factor 2, tolerance 1.5).

Example:
    >>> ctrl = AdaptiveEntropyCoef(target=0.2, coef=0.0)
    >>> ctrl.applied_coef  # no step measured yet: the bonus is off
    0.0
    >>> ctrl.update(0.1)  # entropy below the target: raise the coefficient
    0.005
    >>> ctrl.applied_coef
    0.005
    >>> kl = AdaptiveKLCoef(target=0.01, coef=1.0)
    >>> kl.update(0.05)  # moved too far: double the penalty
    2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AdaptiveEntropyCoef", "AdaptiveKLCoef", "check_tolerance_rule", "tolerance_scale"]


def _check_fields(obj: object, *, positive: tuple[str, ...], non_negative: tuple[str, ...]) -> None:
    """Every named field a finite number, > 0 or >= 0, naming the owner and the setting."""
    owner = type(obj).__name__
    for names, strict in ((positive, True), (non_negative, False)):
        for name in names:
            value = getattr(obj, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and (value > 0 if strict else value >= 0)):
                bound = "> 0" if strict else ">= 0"
                raise ValueError(
                    f"{owner}.{name} must be a finite number {bound}, got {name}={value!r}"
                )


def check_tolerance_rule(owner: str, tolerance: object, factor: object) -> None:
    """PPO's adaptive rule needs ``tolerance > 1`` and ``factor > 1`` (``ValueError`` naming it)."""
    for name, value in (("tolerance", tolerance), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 1:
            raise ValueError(f"{owner}.{name} must be > 1, got {name}={value!r}")


def tolerance_scale(
    measured: float | None, target: float, tolerance: float, factor: float
) -> float | None:
    """PPO's adaptive rule (Schulman et al. 2017, section 4) as a multiplier.

    Returns ``factor`` when ``measured > target * tolerance``, ``1 / factor`` when ``measured <
    target / tolerance``, and None inside the dead zone or without a (finite) measurement. Shared
    by :class:`AdaptiveKLCoef` and :class:`erc_gym.adaptive_band.AdaptiveERCBand`.
    """
    if measured is None or not math.isfinite(measured):
        return None
    if measured > target * tolerance:
        return factor
    if measured < target / tolerance:
        return 1.0 / factor
    return None


@dataclass
class AdaptiveEntropyCoef:
    """Entropy-bonus coefficient that rises while the entropy is at or below a target.

    Args:
        target: mean token entropy (nats) at or below which the coefficient grows and the bonus is
            applied (TRL's ``entropy_target``, default 0.2).
        coef: starting coefficient (TRL's ``entropy_coef``).
        delta: step of the coefficient per optimiser step (``entropy_coef_delta``).
        coef_min: smallest coefficient (``entropy_coef_min``).
        coef_max: largest coefficient (``entropy_coef_max``).

    Raises:
        ValueError: naming the setting and its value.
    """

    target: float = 0.2
    coef: float = 0.0
    delta: float = 0.005
    coef_min: float = 0.0
    coef_max: float = 1.0

    def __post_init__(self) -> None:
        _check_fields(
            self, positive=("target", "delta"), non_negative=("coef", "coef_min", "coef_max")
        )
        if self.coef_min > self.coef_max:
            raise ValueError(
                f"AdaptiveEntropyCoef needs coef_min <= coef_max, got coef_min={self.coef_min}, "
                f"coef_max={self.coef_max}"
            )
        #: Mean entropy of the last optimiser step (inf before the first: the bonus is off).
        self.last_entropy = math.inf

    @property
    def applied_coef(self) -> float:
        """The coefficient the next optimiser step applies (0 while the entropy is above target)."""
        return self.coef if self.last_entropy <= self.target else 0.0

    def update(self, entropy: float) -> float:
        """Record one optimiser step's mean entropy; returns the coefficient after the update.

        A NaN entropy (a step without valid tokens) leaves the controller unchanged.
        """
        if math.isnan(entropy):
            return self.coef
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = float(entropy)
        return self.coef

    def state_dict(self) -> dict[str, float]:
        """The controller's state (for checkpoints)."""
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.coef, self.last_entropy = float(state["coef"]), float(state["last_entropy"])


@dataclass
class AdaptiveKLCoef:
    """KL-penalty coefficient steered to a target KL per update (PPO's adaptive penalty).

    Raises ``ValueError`` naming the setting and its value on a bad one.
    """

    target: float
    """The mean KL(old || new) per update to aim for (the paper's ``d_targ``), > 0."""
    coef: float = 1.0
    """The starting coefficient (``beta``), > 0."""
    tolerance: float = 1.5
    """Dead zone, > 1 (the paper: 1.5)."""
    factor: float = 2.0
    """Multiplicative step, > 1 (the paper: 2)."""

    def __post_init__(self) -> None:
        _check_fields(self, positive=("target", "coef"), non_negative=())
        check_tolerance_rule("AdaptiveKLCoef", self.tolerance, self.factor)

    def update(self, kl: float | None) -> float:
        """Move the coefficient after one update; returns the coefficient for the next one.

        Args:
            kl: the update's mean KL(old || new), or None / NaN when it was not measured.
        """
        scale = tolerance_scale(kl, self.target, self.tolerance, self.factor)
        if scale is not None:
            self.coef *= scale
        return self.coef

    def state_dict(self) -> dict[str, float]:
        """The controller's state (for checkpoints)."""
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.coef = float(state["coef"])
