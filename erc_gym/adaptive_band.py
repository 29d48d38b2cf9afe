"""An adaptive ERC band that steers the clip fraction to a target (this project's rule, not the
paper's).

The paper (Su et al. 2025, arXiv 2512.05591) uses a fixed band, (0.95, 1.05). How much such a band
clips depends on the action-space size and on how far the policy moves per rollout (measured in
``docs/when_to_use_erc.md``): 0.02% to 23% on VocabBandit, 46-72% on 2-3-action control tasks. The
rule here targets the share instead of the band, in the manner of PPO's adaptive KL coefficient
(Schulman et al. 2017, arXiv 1707.06347, section 4):

* after each rollout's updates, measure ``f``, ERC's clip fraction on that rollout's *off-policy*
  steps (every optimiser step after the first; the first step is on-policy, ``rho = 1``, and ERC
  never clips there, so it would only dilute the measurement);
* if ``f > target * tolerance``, widen both half-widths (``1 - low`` and ``high - 1``) by
  ``factor``; if ``f < target / tolerance``, narrow them by ``factor``; otherwise keep the band;
* clamp each half-width to ``[floor, max_half_width]``, where the floor is, by default, the
  starting band's half-width on that side: the band never gets narrower than where it started.

The floor is the one change from PPO's symmetric rule, and it comes from a measurement
(``docs/when_to_use_erc.md`` section 5): where the policy moves little per rollout, (0.95, 1.05)
clips almost nothing, and a rule free to narrow the band forces ERC to clip the target share there,
which cost 0.021 of final reward (0.680 -> 0.659) on VocabBandit at 2 steps x lr 0.05 (experiment
``stress_bandit_adaptive_narrow``). With the floor, the rule only caps ERC's clip share: a band
that clips too much (a small action space, a large update) is widened, and narrowed back toward
its start when it clips too little. To let the band narrow freely, start narrow (e.g.
``low=0.99, high=1.01``) or pass ``min_half_width``.

Measured (``docs/when_to_use_erc.md`` section 5): on the VocabBandit stress map, target 0.2 lands
between the fixed bands (0.95, 1.05) and (0.8, 1.2) on both final reward and entropy smoothness,
better than neither on both; on CartPole-GPPO with 20 epochs per rollout it widened the band to its
maximum as the policy destabilised (clipping rises with instability), so it is not a stabiliser.

A rollout without an off-policy step (one optimiser step per rollout) leaves the band as it is.
The loss is unchanged: :func:`erc_gym.losses.policy_loss` takes the current band as an
:class:`~erc_gym.losses.ERCConfig`; trainers call :meth:`AdaptiveERCBand.update` between rollouts.
The trainers' setting is ``erc_target_clip_fraction`` (None: the fixed band, the default).

Example:
    >>> band = AdaptiveERCBand(target=0.2, low=0.95, high=1.05)
    >>> new = band.update(0.5)  # clipped too much: widen the half-widths by 1.5
    >>> round(new.low, 4), round(new.high, 4)
    (0.925, 1.075)
    >>> band.update(None) == new  # no off-policy step this rollout: keep
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from erc_gym.adaptive_coef import check_tolerance_rule, tolerance_scale
from erc_gym.losses import ERCConfig, LossStats, loss_metrics

__all__ = ["AdaptiveERCBand", "check_target_clip_fraction", "off_policy_clip_fraction"]

#: The trainers' name of the setting (used in error messages).
SETTING = "erc_target_clip_fraction"


def check_target_clip_fraction(
    target: float | None, erc_low: object = None, erc_high: object = None
) -> None:
    """Raise ``ValueError`` unless ``target`` is None or a number in (0, 1) with ERC on.

    Args:
        target: the ``erc_target_clip_fraction`` setting.
        erc_low: the run's ``erc_low`` (the adaptive band's starting lower bound).
        erc_high: the run's ``erc_high``.
    """
    if target is None:
        return
    if (
        isinstance(target, bool)
        or not isinstance(target, int | float)
        or not 0.0 < float(target) < 1.0
    ):
        raise ValueError(
            f"{SETTING} must be a clip fraction in (0, 1) (e.g. 0.2) or None for the fixed band, "
            f"got {SETTING}={target!r}"
        )
    if erc_low is None or erc_high is None:
        raise ValueError(
            f"{SETTING}={target!r} adapts the ERC band, but ERC is off (erc_low={erc_low!r}, "
            f"erc_high={erc_high!r}); set the starting band, e.g. erc_low=0.95, erc_high=1.05"
        )


def off_policy_clip_fraction(stats: Sequence[LossStats]) -> float | None:
    """ERC's clip fraction over the off-policy steps of one rollout (all but the first step).

    Args:
        stats: the :class:`~erc_gym.losses.LossStats` of each optimiser step on one rollout, in
            order, all with the same (ERC-on) loss configuration.

    Returns:
        The token-weighted share of valid tokens whose gradient ERC stopped on steps 2..n, or
        None when the rollout had a single step (nothing off-policy to measure) or ERC is off.
    """
    if len(stats) < 2:
        return None
    return loss_metrics(stats[1:]).get("erc_clip_fraction")


@dataclass
class AdaptiveERCBand:
    """A band whose half-widths follow the ERC clip fraction to ``target`` (see module docstring).

    Args:
        target: the clip fraction to aim for on off-policy steps, in (0, 1); the paper reports
            ERC clipping about 20% of tokens.
        low: starting lower bound (the band moves from here).
        high: starting upper bound.
        tolerance: dead zone, > 1: no change while ``target / tolerance <= f <= target *
            tolerance`` (PPO's adaptive KL uses 1.5).
        factor: multiplicative step of the half-widths, > 1.
        min_half_width: smallest half-width on both sides, > 0; None (default): the starting
            band's half-width on each side (the band never gets narrower than its start).
        max_half_width: largest half-width, < 1 (``low`` stays above 0); a starting half-width
            above it is kept as that side's largest.

    Raises:
        ValueError: naming the setting and its value.
    """

    target: float
    low: float = 0.95
    high: float = 1.05
    tolerance: float = 1.5
    factor: float = 1.5
    min_half_width: float | None = None
    max_half_width: float = 0.99

    def __post_init__(self) -> None:
        check_target_clip_fraction(self.target, self.low, self.high)
        ERCConfig(self.low, self.high)  # a valid starting band
        check_tolerance_rule("AdaptiveERCBand", self.tolerance, self.factor)
        floor = self.min_half_width
        if not 0 < self.max_half_width < 1 or (
            floor is not None and not 0 < floor <= self.max_half_width
        ):
            raise ValueError(
                "AdaptiveERCBand needs 0 < min_half_width <= max_half_width < 1, got "
                f"min_half_width={self.min_half_width!r}, max_half_width={self.max_half_width!r}"
            )
        start = (1.0 - self.low, self.high - 1.0)
        floors = start if floor is None else (floor, floor)
        # (lowest, highest) half-width of the low and the high side
        self._limits = (
            (floors[0], max(self.max_half_width, floors[0])),
            (floors[1], max(self.max_half_width, floors[1])),
        )

    @property
    def band(self) -> ERCConfig:
        """The band in force, for :func:`erc_gym.losses.policy_loss`."""
        return ERCConfig(self.low, self.high)

    def update(self, clip_fraction: float | None) -> ERCConfig:
        """Move the band after one rollout; returns the band for the next one.

        Args:
            clip_fraction: ERC's clip fraction on the rollout's off-policy steps
                (:func:`off_policy_clip_fraction`), or None / NaN when there were none.
        """
        scale = tolerance_scale(clip_fraction, self.target, self.tolerance, self.factor)
        if scale is None:
            return self.band
        (lo_min, lo_max), (hi_min, hi_max) = self._limits
        self.low = 1.0 - min(max((1.0 - self.low) * scale, lo_min), lo_max)
        self.high = 1.0 + min(max((self.high - 1.0) * scale, hi_min), hi_max)
        return self.band

    def state_dict(self) -> dict[str, float]:
        """The band in force (for checkpoints)."""
        return {"low": self.low, "high": self.high}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.low, self.high = float(state["low"]), float(state["high"])
