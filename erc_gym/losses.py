"""The one policy-gradient loss of erc_gym: clip variant x ERC mask x aggregation.

Every trainer in the project (the SB3 algorithm, the LLM trainer, the TRL / verl adapters) calls
:func:`policy_loss`. It sees tensors only and is built from three independent per-axis pieces:

1. :func:`clipped_objective` -- the per-token surrogate for the clip variant:

   * PPO / DAPO clip-higher (Schulman et al. 2017, arXiv 1707.06347; Yu et al. 2025,
     arXiv 2503.14476)::

         r  = exp(clamp(logp - logp_old, -20, 20))
         l  = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))

   * GPPO (Klear-Reasoner, arXiv 2508.07629): same forward value, but the clip bounds carry
     gradient, ``l2 = -A clip(r, (1 - eps_low) r / sg(r), (1 + eps_high) r / sg(r))``. The
     per-token gradient is ``F A grad(logp)`` with ``F = r`` inside the band, ``F = 1 + eps_high``
     where ``A > 0, r > 1 + eps_high`` and ``F = 1 - eps_low`` where ``A < 0, r < 1 - eps_low``.

   * optional dual-clip (Ye et al. 2020, arXiv 1912.09729): where ``A < 0``,
     ``l = min(l, -A c)``, which stops the gradient of tokens with ``r > c``.

2. :func:`erc_keep_mask` -- Entropy Ratio Clipping (Su et al. 2025, arXiv 2512.05591)::

       rho  = (H_new + 1e-8) / (H_old + 1e-8)          (no gradient through rho)
       keep = (low < rho) & (rho < high) & valid
       l    = where(keep, l, sg(l))

   Out-of-band tokens keep their forward value and stay in the aggregation denominator; only
   their gradient is stopped (the reference semantics, ``docs/method.md`` section 2).

3. :func:`aggregate` -- verl's four ``loss_agg_mode`` values.

The rival methods, baselines and controls of the comparison (``docs/rivals.md``) are further
configurations of the same function, never copies of it:

* more clip variants: ``"none"`` (the unclipped ``-A r``, KL-Cov's base) and DPPO's binary
  trust regions ``"dppo-tv"`` / ``"dppo-kl"`` (Qi et al. 2026, arXiv 2602.04879;
  :func:`dppo_objective`)::

      inside = |p - p_old| (TV) or binary KL(p_old, p) (KL) within (eps_low, eps_high),
               the side chosen by the sign of A, moves against A always allowed (KL)
      l      = -A sg(min(r, ratio_cap)) logp [inside]

* one more token gate beside ERC (``LossConfig.gate``): :class:`RandomMask` (the referee's
  control: a random stop-gradient of a fixed share, or of exactly as many tokens as an ERC band
  would stop), :class:`ClipCov` and :class:`KLCov` (Cui et al. 2025, arXiv 2505.22617) and
  :class:`HighEntropy` (Wang et al. 2025, arXiv 2506.01939);
* regularisers added after aggregation, as token means over the valid tokens: an entropy bonus
  ``- c_H mean(H)`` and a penalty ``+ beta mean(KL(pi_old || pi))`` (exact per state when the
  trainer passes ``kl``, else the k3 estimator); :mod:`erc_gym.adaptive_coef` adapts either
  coefficient between steps;
* the equal-step control (``LossConfig.equal_step``): ERC off, but :attr:`LossOutput.step_scale`
  reports the share of valid tokens a band *would* keep, by which trainers scale the step's
  learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "DPPO_VARIANTS",
    "ENTROPY_METRIC_KEYS",
    "GATE_METRICS",
    "LOG_RATIO_CLAMP",
    "LOSS_METRIC_KEYS",
    "METHODS",
    "METHOD_METRIC_KEYS",
    "RECIPES",
    "AggregationMode",
    "ClipCov",
    "ClipVariant",
    "ERCConfig",
    "HighEntropy",
    "KLCov",
    "KLEstimator",
    "LossConfig",
    "LossOutput",
    "LossStats",
    "RandomMask",
    "TokenGate",
    "aggregate",
    "clip_cov_mask",
    "clip_flags",
    "clipped_objective",
    "dppo_objective",
    "entropy_ratio",
    "erc_keep_mask",
    "high_entropy_keep",
    "kl_cov_mask",
    "loss_metrics",
    "method_settings",
    "policy_loss",
    "random_mask",
    "sb3_recipe_kwargs",
]

#: Clip variant of :class:`LossConfig`: ``"ppo"`` (the clip stops the gradient), ``"gppo"``
#: (gradient-preserving clip), ``"none"`` (the plain ``-A r``) or one of DPPO's binary trust
#: regions (:data:`DPPO_VARIANTS`).
ClipVariant = Literal["ppo", "gppo", "none", "dppo-tv", "dppo-kl"]
#: The clip variants that are DPPO's binary trust regions (:func:`dppo_objective`).
DPPO_VARIANTS = ("dppo-tv", "dppo-kl")
#: Estimator of the KL penalty: ``"exact"`` (the trainer passes the per-state KL) or ``"k3"``.
KLEstimator = Literal["exact", "k3"]
#: Aggregation of the per-token loss, verl's four ``loss_agg_mode`` values (see :func:`aggregate`).
AggregationMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]

_AGGREGATIONS = get_args(AggregationMode)

#: The log-ratio is clamped to +-20 before exponentiation (as in verl) so one stale token cannot
#: produce an inf ratio.
LOG_RATIO_CLAMP = 20.0
#: Added to both entropies before dividing (the reference code's epsilon).
ENTROPY_EPS = 1e-8
#: How far below 0 an entropy may be computed (rounding) before :func:`loss_metrics` refuses it
#: as not an entropy (e.g. SB3's entropy loss, which is ``-H``).
NEGATIVE_ENTROPY_TOL = 1e-3


def _check_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")


@dataclass(frozen=True)
class ERCConfig:
    """Band of the entropy ratio outside which a token's gradient is stopped.

    Args:
        low: lower bound of ``rho = H_new / H_old`` (strict: ``rho <= low`` is clipped). The
            paper's band is (0.95, 1.05); the reference code's config default is (0.8, 1.2).
        high: upper bound (strict: ``rho >= high`` is clipped). ``math.inf`` disables the upper
            side.

    Raises:
        ValueError: unless ``0 <= low < 1 < high``.
    """

    low: float = 0.95
    high: float = 1.05

    def __post_init__(self) -> None:
        _check_number("ERCConfig.low", self.low)
        _check_number("ERCConfig.high", self.high)
        if not 0.0 <= self.low < 1.0:
            raise ValueError(
                f"ERCConfig.low must satisfy 0 <= low < 1, got low={self.low}; "
                "the band must contain the on-policy ratio 1 (e.g. low=0.95)"
            )
        if not self.high > 1.0:
            raise ValueError(
                f"ERCConfig.high must be > 1, got high={self.high}; "
                "the band must contain the on-policy ratio 1 (e.g. high=1.05)"
            )


def _check_share(owner: str, name: str, value: object, *, closed_low: bool = False) -> None:
    """``value`` in (0, 1] (or [0, 1] with ``closed_low``), naming the setting otherwise."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    low_ok = ok and (value >= 0 if closed_low else value > 0)  # type: ignore[operator]
    if not (low_ok and value <= 1):  # type: ignore[operator]
        bound = "[0, 1]" if closed_low else "(0, 1]"
        raise ValueError(f"{owner}.{name} must be in {bound}, got {name}={value!r}")


@dataclass(frozen=True)
class RandomMask:
    """The random control of ERC: stop the gradient of randomly drawn valid tokens.

    The drawn tokens keep their forward value and stay in the aggregation's denominator, exactly
    like ERC's clipped tokens, so the only difference from ERC is *which* tokens are chosen.
    Exactly one of the two settings is given.

    Args:
        share: a fixed share of the valid tokens of each call, drawn as exactly
            ``floor(share * n_valid + 0.5)`` tokens.
        match: the *matched* control: in each call, exactly as many tokens as this ERC band
            would stop (``n_valid - #(low < rho < high)``; needs the entropies). ERC itself must
            be off.

    Raises:
        ValueError: unless exactly one of ``share`` (in (0, 1]) and ``match`` is set.
    """

    share: float | None = None
    match: ERCConfig | None = None

    def __post_init__(self) -> None:
        if (self.share is None) == (self.match is None):
            raise ValueError(
                "RandomMask needs exactly one of share (a fixed share of tokens) and match "
                f"(an ERC band whose count to imitate), got share={self.share!r}, "
                f"match={self.match!r}"
            )
        if self.share is not None:
            _check_share("RandomMask", "share", self.share)
        if self.match is not None and not isinstance(self.match, ERCConfig):
            raise ValueError(f"RandomMask.match must be an ERCConfig, got {self.match!r}")


@dataclass(frozen=True)
class ClipCov:
    """Clip-Cov (Cui et al. 2025, arXiv 2505.22617; verl loss mode ``clip_cov``).

    Per valid token, the centred covariance ``c = (A - mean(A)) (logp - mean(logp))`` (means
    over the valid tokens). Among the tokens with ``lb < c < ub`` that the PPO clip did not
    already clip, ``max(int(ratio * n_valid), 1)`` are drawn at random (``torch.randperm``) and
    their per-token loss is multiplied by 0: no gradient, and they stay in the denominator.

    Args:
        ratio: share of the valid tokens to draw (verl's ``clip_cov_ratio``, default 2e-4, which
            is one token per batch below 5,000 tokens: choose it per scale).
        lb: lower bound of the candidates' covariance (``clip_cov_lb``).
        ub: upper bound (``clip_cov_ub``).
    """

    ratio: float = 2e-4
    lb: float = 1.0
    ub: float = 5.0

    def __post_init__(self) -> None:
        _check_share("ClipCov", "ratio", self.ratio)
        _check_number("ClipCov.lb", self.lb)
        _check_number("ClipCov.ub", self.ub)
        if not self.lb < self.ub:
            raise ValueError(f"ClipCov needs lb < ub, got lb={self.lb}, ub={self.ub}")


@dataclass(frozen=True)
class KLCov:
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617; verl loss mode ``kl_cov``).

    The ``max(1, int(ratio * n_valid))`` valid tokens with the largest centred covariance
    ``(A - mean(A)) (logp - mean(logp))`` get ``coef * |logp - logp_old|`` added to their
    per-token loss. verl's KL-Cov has no PPO clip: pair it with ``clip="none"`` (the registry's
    ``kl-cov`` does); with another clip variant it is this project's combination.

    Args:
        ratio: share of the valid tokens penalised (``kl_cov_ratio``, default 2e-4).
        coef: weight of the penalty (verl's ``ppo_kl_coef``, default 0.1).
    """

    ratio: float = 2e-4
    coef: float = 0.1

    def __post_init__(self) -> None:
        _check_share("KLCov", "ratio", self.ratio)
        _check_number("KLCov.coef", self.coef)
        if self.coef < 0:
            raise ValueError(f"KLCov.coef must be >= 0, got coef={self.coef}")


@dataclass(frozen=True)
class HighEntropy:
    """Train only on the high-entropy "forking" tokens (Wang et al. 2025, arXiv 2506.01939).

    TRL's rule (``GRPOConfig.top_entropy_quantile``): the threshold is the ``1 - quantile``
    quantile (linear interpolation, ``torch.quantile``) of the current entropies of the valid
    tokens; tokens with entropy at or above it keep their loss, the others' per-token loss is
    multiplied by 0 (no gradient; they stay in the denominator). The entropy bonus, when on,
    is then averaged over the kept tokens only, as in TRL.

    Args:
        quantile: the share of tokens kept, ``rho`` in [0, 1] (the paper: 0.2); 1 keeps all, 0
            only the highest-entropy token(s).
    """

    quantile: float = 0.2

    def __post_init__(self) -> None:
        _check_share("HighEntropy", "quantile", self.quantile, closed_low=True)


#: The token gates :func:`policy_loss` applies beside ERC (``LossConfig.gate``).
TokenGate = RandomMask | ClipCov | KLCov | HighEntropy


@dataclass(frozen=True)
class LossConfig:
    """Static configuration of :func:`policy_loss`.

    Args:
        clip: ``"ppo"`` (standard clip; DAPO clip-higher when ``eps_high > eps_low``),
            ``"gppo"`` (gradient-preserving clip), ``"none"`` (no clip, ``-A r``) or DPPO's
            binary trust region ``"dppo-tv"`` / ``"dppo-kl"`` (:func:`dppo_objective`).
        eps_low: lower clip range, the ratio is bounded below by ``1 - eps_low`` (DPPO: the
            divergence threshold for moves against a non-positive advantage).
        eps_high: upper clip range, the ratio is bounded above by ``1 + eps_high`` (DPPO: the
            threshold for moves along a positive advantage).
        dual_clip_c: dual-clip constant ``c > 1`` for negative advantages, or None (off). Not
            with DPPO, which truncates its weight with ``ratio_cap`` instead.
        erc: entropy-ratio band, or None (ERC off).
        aggregation: how the per-token loss matrix becomes a scalar (see :func:`aggregate`).
        ratio_cap: DPPO only: the truncation ``C`` of its detached weight ``min(r, C)`` (verl's
            ``clip_ratio_c``), or None (no truncation).
        gate: a token gate beside ERC (:data:`TokenGate`), or None.
        entropy_coef: fixed entropy-bonus coefficient ``c_H >= 0``: the loss gets
            ``- c_H * mean(H)`` over the valid tokens (the kept ones with :class:`HighEntropy`).
            Needs a differentiable ``entropy``. An adaptive coefficient is passed per call
            (``policy_loss(..., entropy_coef=...)``, :mod:`erc_gym.adaptive_coef`).
        kl_coef: fixed coefficient ``beta >= 0`` of ``+ beta * mean(KL(pi_old || pi))`` over the
            valid tokens (PPO-penalty); adaptive as ``entropy_coef``.
        kl_estimator: ``"exact"``: the caller passes the per-state KL of the full distributions
            (``policy_loss(..., kl=...)``, from :mod:`erc_gym.entropy`); ``"k3"``: the estimator
            ``(r - 1) - log r`` from the sampled token (for trainers without the old
            distribution).
        equal_step: the equal-step control: an ERC band that is *not* applied; the share of
            valid tokens it would keep is returned as :attr:`LossOutput.step_scale`, by which the
            trainer multiplies the step's learning rate. ERC must be off.

    Use the constructors :meth:`ppo`, :meth:`dapo` and :meth:`gppo` for the published recipes
    and :func:`method_settings` for the rival methods by name.
    """

    clip: ClipVariant = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = None
    erc: ERCConfig | None = None
    aggregation: AggregationMode = "token-mean"
    ratio_cap: float | None = None
    gate: TokenGate | None = None
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "exact"
    equal_step: ERCConfig | None = None

    def __post_init__(self) -> None:
        if self.clip not in get_args(ClipVariant):
            raise ValueError(
                f"LossConfig.clip must be one of {get_args(ClipVariant)}, got {self.clip!r}"
            )
        if self.aggregation not in get_args(AggregationMode):
            raise ValueError(
                f"LossConfig.aggregation must be one of {get_args(AggregationMode)}, "
                f"got {self.aggregation!r}"
            )
        for name in ("eps_low", "eps_high"):
            value = getattr(self, name)
            _check_number(f"LossConfig.{name}", value)
            if value < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {name}={value}")
        if self.eps_low >= 1:
            raise ValueError(
                f"LossConfig.eps_low must be < 1 (the lower bound 1 - eps_low must stay "
                f"positive), got eps_low={self.eps_low}"
            )
        if self.dual_clip_c is not None:
            _check_number("LossConfig.dual_clip_c", self.dual_clip_c)
            if self.dual_clip_c <= 1:
                raise ValueError(
                    f"LossConfig.dual_clip_c must be > 1 (or None to disable dual-clip), "
                    f"got dual_clip_c={self.dual_clip_c}"
                )
        if self.erc is not None and not isinstance(self.erc, ERCConfig):
            raise ValueError(f"LossConfig.erc must be an ERCConfig or None, got {self.erc!r}")
        self._check_methods()

    def _check_methods(self) -> None:
        """The rival methods' settings and the combinations that are not defined."""
        dppo = self.clip in DPPO_VARIANTS
        if dppo and self.dual_clip_c is not None:
            raise ValueError(
                f"LossConfig.clip={self.clip!r} takes no dual-clip (got dual_clip_c="
                f"{self.dual_clip_c}): DPPO truncates its importance weight with ratio_cap instead"
            )
        if self.ratio_cap is not None:
            _check_number("LossConfig.ratio_cap", self.ratio_cap)
            if not dppo or self.ratio_cap <= 0:
                raise ValueError(
                    f"LossConfig.ratio_cap is DPPO's weight truncation: a number > 0 with clip in "
                    f"{DPPO_VARIANTS}, got ratio_cap={self.ratio_cap} with clip={self.clip!r}"
                )
        if self.gate is not None and not isinstance(self.gate, get_args(TokenGate)):
            raise ValueError(
                f"LossConfig.gate must be a RandomMask, ClipCov, KLCov or HighEntropy (or None), "
                f"got {self.gate!r}"
            )
        if isinstance(self.gate, ClipCov) and dppo:
            raise ValueError(
                "ClipCov excludes the tokens the PPO clip already clipped, which "
                f"clip={self.clip!r} does not define: use clip 'ppo', 'gppo' or 'none' with ClipCov"
            )
        if isinstance(self.gate, RandomMask) and self.gate.match is not None and self.erc:
            raise ValueError(
                "RandomMask(match=...) is the random control of ERC and replaces it: set erc=None "
                f"(got erc={self.erc})"
            )
        if self.equal_step is not None:
            if not isinstance(self.equal_step, ERCConfig):
                raise ValueError(
                    f"LossConfig.equal_step must be an ERCConfig or None, got {self.equal_step!r}"
                )
            if self.erc is not None:
                raise ValueError(
                    "LossConfig.equal_step is the control of ERC with ERC off: set erc=None "
                    f"(got erc={self.erc})"
                )
        for name in ("entropy_coef", "kl_coef"):
            value = getattr(self, name)
            _check_number(f"LossConfig.{name}", value)
            if not 0 <= value < math.inf:
                raise ValueError(f"LossConfig.{name} must be a finite number >= 0, got {value}")
        if self.kl_estimator not in get_args(KLEstimator):
            raise ValueError(
                f"LossConfig.kl_estimator must be one of {get_args(KLEstimator)}, "
                f"got {self.kl_estimator!r}"
            )

    @property
    def needs_entropies(self) -> bool:
        """Whether :func:`policy_loss` needs the per-token entropies: ERC, the matched random
        control and the equal-step control compare current and old ones, the high-entropy gate
        ranks the current ones."""
        gate = self.gate
        return (
            self.erc is not None
            or self.equal_step is not None
            or isinstance(gate, HighEntropy)
            or (isinstance(gate, RandomMask) and gate.match is not None)
        )

    @classmethod
    def ppo(cls, erc: ERCConfig | None = None) -> LossConfig:
        """PPO-clip, eps 0.2/0.2, no dual-clip, token-mean."""
        return cls(clip="ppo", eps_low=0.2, eps_high=0.2, erc=erc)

    @classmethod
    def dapo(cls, erc: ERCConfig | None = None) -> LossConfig:
        """DAPO clip-higher: eps 0.2/0.28, dual-clip c = 10, token-mean (the ERC paper's base)."""
        return cls(clip="ppo", eps_low=0.2, eps_high=0.28, dual_clip_c=10.0, erc=erc)

    @classmethod
    def gppo(cls, erc: ERCConfig | None = None) -> LossConfig:
        """GPPO gradient-preserving clip: eps 0.2/0.2, dual-clip c = 10, token-mean."""
        return cls(clip="gppo", eps_low=0.2, eps_high=0.2, dual_clip_c=10.0, erc=erc)

    @classmethod
    def named(
        cls, name: str, erc_low: float | None = None, erc_high: float | None = None
    ) -> LossConfig:
        """The recipe ``"ppo"``, ``"dapo"`` or ``"gppo"`` with an optional ERC band.

        ``erc_low`` and ``erc_high`` must both be set (ERC on) or both be None (ERC off).
        """
        if name not in RECIPES:
            raise ValueError(f"loss must be one of {sorted(RECIPES)}, got loss={name!r}")
        if (erc_low is None) != (erc_high is None):
            raise ValueError(
                f"erc_low and erc_high must both be set or both be None, got "
                f"erc_low={erc_low}, erc_high={erc_high}"
            )
        erc = None
        if erc_low is not None and erc_high is not None:
            erc = ERCConfig(erc_low, erc_high)
        return RECIPES[name](erc=erc)


#: The published recipes by name -- the ``loss`` of the trainers and the ``algorithms`` of an
#: experiment grid: name -> :class:`LossConfig` factory taking the ERC band. Names, their order
#: and their numbers are taken from here everywhere (:func:`sb3_recipe_kwargs` for ERCPPO).
RECIPES: dict[str, Callable[..., LossConfig]] = {
    "ppo": LossConfig.ppo,
    "dapo": LossConfig.dapo,
    "gppo": LossConfig.gppo,
}


def sb3_recipe_kwargs(name: str) -> dict[str, Any]:
    """The recipe ``name`` as :class:`~erc_gym.sb3.ERCPPO` keyword arguments.

    SB3's ``clip_range`` (the preset's) stays the lower clip range; the recipe adds what differs
    from PPO-clip: ``clip_variant``, ``clip_range_high`` (when ``eps_high != eps_low``) and
    ``dual_clip``. ``{}`` for ``ppo``.
    """
    config = RECIPES[name]()
    out: dict[str, Any] = {}
    if config.clip != "ppo":
        out["clip_variant"] = config.clip
    if config.eps_high != config.eps_low:
        out["clip_range_high"] = config.eps_high
    if config.dual_clip_c is not None:
        out["dual_clip"] = config.dual_clip_c
    return out


#: Keys of :func:`loss_metrics` present when entropies are given (``docs/metrics.md``).
ENTROPY_METRIC_KEYS = (
    "erc_clip_fraction",
    "erc_clip_fraction_low",
    "erc_clip_fraction_high",
    "entropy_ratio_mean",
    "entropy_mean",
    "entropy_old_mean",
    "entropy_ratio_min",
    "entropy_ratio_max",
    "erc_clipped_entropy_old_mean",
    "erc_kept_entropy_old_mean",
)
#: Every key of :func:`loss_metrics` (``docs/metrics.md`` is the contract). The adapters filter
#: or rename this list instead of keeping their own.
LOSS_METRIC_KEYS = (
    "pg_loss",
    "clip_fraction",
    "clip_fraction_low",
    "clip_fraction_high",
    "dual_clip_fraction",
    "approx_kl",
    "ppo_kl",
    "ratio_mean",
    *ENTROPY_METRIC_KEYS,
)
#: Keys :func:`loss_metrics` adds when a rival method is on (``docs/rivals.md``): the share of
#: tokens each token gate acted on, the regularisers' coefficients and KL, the equal-step scale.
METHOD_METRIC_KEYS = (
    "gate_fraction",
    "random_mask_fraction",
    "clip_cov_fraction",
    "kl_cov_fraction",
    "entropy_gate_fraction",
    "entropy_coef",
    "kl_coef",
    "kl_mean",
    "equal_step_scale",
)


@dataclass
class LossStats:
    """Detached tensors of one :func:`policy_loss` call, from which metrics are computed.

    Kept so that a trainer taking many mini-batch steps can reduce the metrics of the whole update
    with one call of :func:`loss_metrics` (one host sync per update, no per-step metric work).

    Attributes:
        loss: the aggregated policy loss (without the regularisers), detached, shape ``()``.
        log_ratio: clamped ``logp - logp_old``, ``(B, T)``.
        advantages: advantages broadcast to ``(B, T)``.
        valid: boolean mask ``(B, T)``, or None (all valid).
        entropy: current entropy ``(B, T)`` or None.
        old_entropy: old entropy ``(B, T)`` or None.
        config: the :class:`LossConfig` used.
        rho: the entropy ratio ``(B, T)`` if the loss already computed it (ERC on), else None.
        keep: ERC's keep-mask ``(B, T)`` as the loss applied it (ERC on), else None.
        gate: the tokens the token gate acted on ``(B, T)`` (stopped, zeroed or penalised), or
            None (no gate).
        outside: DPPO: the tokens outside the trust region ``(B, T)``, else None.
        kl: the per-token KL the penalty used ``(B, T)``, or None (no penalty).
        entropy_coef: the entropy-bonus coefficient applied, or None (no bonus).
        kl_coef: the KL-penalty coefficient applied, or None (no penalty).
        step_scale: the equal-step control's kept share, shape ``()``, or None.
    """

    loss: Tensor
    log_ratio: Tensor
    advantages: Tensor
    valid: Tensor | None
    entropy: Tensor | None
    old_entropy: Tensor | None
    config: LossConfig
    rho: Tensor | None = None
    keep: Tensor | None = None
    gate: Tensor | None = None
    outside: Tensor | None = None
    kl: Tensor | None = None
    entropy_coef: float | None = None
    kl_coef: float | None = None
    step_scale: Tensor | None = None


@dataclass
class LossOutput:
    """What :func:`policy_loss` returns.

    Attributes:
        loss: scalar loss to minimise (differentiable).
        metrics: plain floats, keys documented in ``docs/metrics.md`` (empty when
            ``policy_loss(..., metrics=False)``; reduce ``stats`` later with :func:`loss_metrics`).
        stats: the detached tensors the metrics are computed from.
        token_loss: per-token loss matrix ``(B, T)`` before aggregation, after clipping and the
            ERC stop-gradient.
        erc_keep: boolean mask of the tokens whose gradient ERC kept (None when ERC is off).
        gate_mask: the tokens the token gate acted on (None without a gate).
        step_scale: the equal-step control's share of valid tokens its band would keep, shape
            ``()`` (1 when no token is valid; None without ``LossConfig.equal_step``): multiply
            the step's learning rate by it.
        bonus_entropy: mean entropy over the entropy bonus's tokens, detached, shape ``()``
            (None without a bonus): what :class:`~erc_gym.adaptive_coef.AdaptiveEntropyCoef`
            reads after the step.
        kl_mean: mean per-token KL of the penalty, detached, shape ``()`` (None without one).
    """

    loss: Tensor
    metrics: dict[str, float]
    stats: LossStats
    token_loss: Tensor
    erc_keep: Tensor | None = None
    gate_mask: Tensor | None = None
    step_scale: Tensor | None = None
    bonus_entropy: Tensor | None = None
    kl_mean: Tensor | None = None


def clipped_objective(
    ratio: Tensor,
    advantages: Tensor,
    *,
    clip: ClipVariant,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> Tensor:
    """Per-token clipped surrogate loss (to minimise).

    Args:
        ratio: importance ratio ``r`` (differentiable).
        advantages: advantages broadcastable to ``ratio``.
        clip: ``"ppo"``, ``"gppo"`` or ``"none"`` (``-A r``; the bounds are ignored).
        eps_low: lower clip range.
        eps_high: upper clip range.
        dual_clip_c: dual-clip constant or None.

    Returns:
        The loss, same shape as ``ratio``. :func:`clip_flags` tells where each bound is active.
    """
    lower, upper = 1.0 - eps_low, 1.0 + eps_high
    neg_adv = -advantages
    if clip == "none":
        loss = neg_adv * ratio
        if dual_clip_c is not None:
            loss = torch.where(advantages < 0, torch.minimum(loss, neg_adv * dual_clip_c), loss)
        return loss
    if clip == "ppo":
        bounded = ratio.clamp(lower, upper)
    else:
        # r / sg(r) == 1 in value but carries d r, so the bound passes gradient scaled by it.
        unit = ratio / ratio.detach()
        bounded = torch.where(
            ratio < lower, lower * unit, torch.where(ratio > upper, upper * unit, ratio)
        )
    loss = torch.maximum(neg_adv * ratio, neg_adv * bounded)
    if dual_clip_c is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, neg_adv * dual_clip_c), loss)
    return loss


def clip_flags(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> dict[str, Tensor]:
    """Where each clip bound of :func:`clipped_objective` is the active term (took effect).

    Returns boolean masks ``clip_low`` (``A < 0, r < 1 - eps_low``), ``clip_high``
    (``A > 0, r > 1 + eps_high``) and ``dual_clip`` (``A < 0, r > c``; all False when off).
    The same for PPO and GPPO: in GPPO the bound is active but still passes gradient.
    """
    negative = advantages < 0
    return {
        "clip_low": negative & (ratio < 1.0 - eps_low),
        "clip_high": (advantages > 0) & (ratio > 1.0 + eps_high),
        "dual_clip": negative & (ratio > dual_clip_c)
        if dual_clip_c is not None
        else torch.zeros_like(negative),
    }


def entropy_ratio(entropy: Tensor, old_entropy: Tensor) -> Tensor:
    """``(H_new + 1e-8) / (H_old + 1e-8)`` in fp32 at least, without gradient."""
    dtype = torch.promote_types(entropy.dtype, torch.float32)
    new = entropy.detach().to(dtype)
    old = old_entropy.detach().to(dtype)
    return (new + ENTROPY_EPS) / (old + ENTROPY_EPS)


def erc_keep_mask(rho: Tensor, valid: Tensor | None, erc: ERCConfig) -> Tensor:
    """Tokens whose gradient ERC keeps: ``(low < rho) & (rho < high) & valid`` (strict)."""
    keep = (rho > erc.low) & (rho < erc.high)
    return keep if valid is None else keep & valid


def dppo_objective(
    log_prob: Tensor,
    old_log_prob: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    *,
    divergence: Literal["tv", "kl"],
    eps_low: float,
    eps_high: float,
    ratio_cap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """DPPO's per-token loss over the binary split "sampled token vs the rest" (arXiv 2602.04879).

    With ``p = exp(logp)`` and ``p_old = exp(logp_old)``, a token is inside the trust region if

    * TV: ``p - p_old <= eps_high`` where ``A > 0`` and ``p - p_old >= -eps_low`` elsewhere;
    * KL: with ``D = p_old log(p_old / p) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))``,
      ``D <= eps_high or p <= p_old`` where ``A > 0`` and ``D <= eps_low or p >= p_old``
      elsewhere (a move against the advantage is always allowed).

    The loss is ``-A sg(min(r, ratio_cap)) logp`` inside the region and 0 outside: a policy
    gradient weighted by the detached, truncated ratio (same gradient as ``-A r`` inside).

    Args:
        log_prob: current log-probs (differentiable), finite.
        old_log_prob: old log-probs, finite.
        ratio: ``exp(clamp(logp - logp_old))``.
        advantages: same shape.
        divergence: ``"tv"`` or ``"kl"``.
        eps_low: threshold on the side of non-positive advantages.
        eps_high: threshold on the side of positive advantages.
        ratio_cap: truncation ``C`` of the weight, or None.

    Returns:
        ``(loss, inside)``: the per-token loss and the boolean trust-region mask.
    """
    with torch.no_grad():
        p = torch.exp(log_prob.detach())
        p_old = torch.exp(old_log_prob)
        positive = advantages > 0
        if divergence == "tv":
            moved = p - p_old
            inside = torch.where(positive, moved <= eps_high, moved >= -eps_low)
        else:
            binary_kl = p_old * (old_log_prob - log_prob.detach()) + (1 - p_old) * torch.log(
                (1.0 - p_old + 1e-8) / (1.0 - p + 1e-8)
            )
            inside = torch.where(
                positive,
                (binary_kl <= eps_high) | (p <= p_old),
                (binary_kl <= eps_low) | (p >= p_old),
            )
        weight = ratio.detach() if ratio_cap is None else ratio.detach().clamp(max=ratio_cap)
    return -advantages * weight * log_prob * inside.to(log_prob.dtype), inside


def random_mask(
    valid: Tensor | None, count: Tensor, shape: Sequence[int], generator: torch.Generator | None
) -> Tensor:
    """Exactly ``count`` valid tokens drawn uniformly at random, as a boolean mask of ``shape``.

    Sync-free: every token gets a uniform key (invalid tokens a key above all valid ones), and the
    tokens whose key ranks below ``count`` are drawn. ``count`` is a 0-d tensor, at most the
    number of valid tokens.

    Args:
        valid: boolean mask of the valid tokens, or None (all valid).
        count: how many to draw.
        shape: the token matrix's shape.
        generator: the random source (its device draws); None: the global RNG.
    """
    device = count.device
    keys = torch.rand(
        tuple(shape), generator=generator, device=None if generator is None else generator.device
    ).to(device)
    if valid is not None:
        keys = torch.where(valid, keys, 2.0)
    order = keys.reshape(-1).argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    return (rank < count).reshape(keys.shape)


def _masked_mean_like_verl(x: Tensor, valid: Tensor) -> Tensor:
    # sum over the valid tokens / (count + 1e-8), the arithmetic of verl's masked_mean, so that
    # Clip-Cov's covariances (and the candidates at its bounds) are the same floats as verl's
    return torch.where(valid, x, 0.0).sum() / (valid.sum() + 1e-8)


def clip_cov_mask(
    log_prob: Tensor,
    advantages: Tensor,
    valid: Tensor,
    clipped: Tensor,
    gate: ClipCov,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Clip-Cov's drawn tokens (boolean mask; see :class:`ClipCov`).

    Draws with ``torch.randperm`` over the candidates in row-major order, as verl does, so with
    ``generator=None`` and the same global RNG state the draw is verl's. Needs the number of
    candidates on the host (one sync, as in verl).

    Args:
        log_prob: current log-probs ``(B, T)``.
        advantages: ``(B, T)``.
        valid: boolean mask of the valid tokens.
        clipped: tokens where the PPO clip is the active term (excluded).
        gate: the :class:`ClipCov` settings.
        generator: the random source; None: the global CPU RNG (verl's).
    """
    with torch.no_grad():
        lp = log_prob.detach()
        cov = (advantages - _masked_mean_like_verl(advantages, valid)) * (
            lp - _masked_mean_like_verl(lp, valid)
        )
        candidates = torch.nonzero((cov > gate.lb) & (cov < gate.ub) & valid & ~clipped)
        drawn = torch.zeros_like(valid)
        n_candidates = len(candidates)
        if n_candidates:
            n_draw = max(int(gate.ratio * int(valid.sum())), 1)
            device = None if generator is None else generator.device
            perm = torch.randperm(n_candidates, generator=generator, device=device)
            chosen = candidates[perm[:n_draw].to(candidates.device)]
            drawn[chosen[:, 0], chosen[:, 1]] = True
    return drawn


def kl_cov_mask(log_prob: Tensor, advantages: Tensor, valid: Tensor, gate: KLCov) -> Tensor:
    """KL-Cov's penalised tokens (boolean mask; see :class:`KLCov`).

    The covariance is ranked over the valid tokens in row-major order (``torch.topk``), with the
    means of the selected values, as verl computes them. One host sync (the count).
    """
    with torch.no_grad():
        flat_valid = torch.nonzero(valid.reshape(-1)).squeeze(-1)
        adv = advantages.detach().reshape(-1)[flat_valid]
        lp = log_prob.detach().reshape(-1)[flat_valid]
        chosen = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
        if len(adv):
            cov = (adv - adv.mean()) * (lp - lp.mean())
            k = max(1, int(len(cov) * gate.ratio))
            chosen[flat_valid[torch.topk(cov, k, largest=True).indices]] = True
    return chosen.reshape(valid.shape)


def high_entropy_keep(entropy: Tensor, valid: Tensor | None, quantile: float) -> Tensor:
    """Tokens at or above the ``1 - quantile`` quantile of the valid tokens' entropies.

    TRL's ``get_high_entropy_mask`` for one process, computed without a host sync: the valid
    entropies are sorted and the quantile is interpolated linearly between order statistics with
    the arithmetic of ``torch.quantile`` (fp32), so the threshold is TRL's to the bit.

    Args:
        entropy: current entropies ``(B, T)``.
        valid: boolean mask of the valid tokens, or None.
        quantile: the share of tokens kept, in [0, 1].

    Returns:
        Boolean mask of the kept tokens (all False when no token is valid).
    """
    with torch.no_grad():
        h = entropy.detach().float()
        if valid is None:
            valid = torch.ones_like(h, dtype=torch.bool)
        ordered = torch.where(valid, h, math.inf).reshape(-1).sort().values
        last = (valid.sum() - 1).clamp(min=0).to(torch.float32)
        q = torch.tensor(1.0 - quantile, dtype=torch.float32, device=h.device)
        rank = q * last
        below = rank.to(torch.long)
        weight = rank - below
        threshold = torch.lerp(ordered[below], ordered[rank.ceil().to(torch.long)], weight)
        return (h >= threshold) & valid


class _StopGradientOutside(torch.autograd.Function):
    """``where(keep, x, sg(x))`` as one node: the value is ``x``, the gradient ``grad * keep``.

    Equivalent to the ``torch.where`` form (a test checks it) but cheaper: no forward copy and a
    single multiplication in the backward pass.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, keep: Tensor) -> Tensor:
        ctx.save_for_backward(keep)
        return x.view_as(x)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, None]:
        (keep,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * keep, None


#: Below this many elements ``torch.where`` is the cheaper stop-gradient (a custom autograd node
#: has a fixed Python cost of tens of microseconds, which dominates small-action RL mini-batches);
#: above it :class:`_StopGradientOutside` saves the forward copy of a large token matrix.
_WHERE_MAX_ELEMENTS = 1 << 12


def _stop_gradient_outside(x: Tensor, keep: Tensor) -> Tensor:
    """Value ``x``, gradient only where ``keep`` (ERC's stop-gradient), cheapest form per size."""
    if x.numel() <= _WHERE_MAX_ELEMENTS:
        return torch.where(keep, x, x.detach())
    return _StopGradientOutside.apply(x, keep)


def aggregate(token_loss: Tensor, mask: Tensor | None, mode: AggregationMode) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar, counting only ``mask`` tokens.

    The mode decides how much each token weighs, and so how long and short responses share the
    gradient:

    * ``token-mean``: ``sum(m l) / sum(m)`` -- every valid token weighs the same (DAPO, ERC).
    * ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO): tokens
      of short responses weigh more.
    * ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
    * ``seq-mean-token-sum-norm``: ``sum(m l) / T`` with ``T = token_loss.shape[-1]`` (Dr. GRPO),
      a constant normaliser, so the weight of a token does not depend on the batch's contents.

    Sequence means run over sequences with at least one valid token. Empty denominators are
    clamped to 1 so an all-masked batch gives a loss of 0 and zero gradients, never NaN. Masked
    positions are selected out (``where``), so a NaN or inf there changes neither the loss nor
    the gradient of any token. Because
    the normalisers depend on the whole batch, compute the loss over the same tokens you would
    average over; verl documents the same point for data-parallel sharding.

    Args:
        token_loss: ``(B, T)`` per-token loss.
        mask: ``(B, T)`` boolean or 0/1 mask of valid tokens (nonzero = valid), or None (all
            valid).
        mode: one of the four names above.

    Returns:
        Scalar tensor.
    """
    if mode not in _AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got loss_agg_mode={mode!r}")
    return _aggregate(token_loss, mask, mode, finite_outside=False)


def _aggregate(
    token_loss: Tensor, mask: Tensor | None, mode: AggregationMode, *, finite_outside: bool
) -> Tensor:
    """:func:`aggregate`; ``finite_outside`` promises finite values and gradients at masked
    positions (as :func:`policy_loss` makes them), so the cheaper ``* mask`` can remove them."""
    if mask is None:
        if mode == "token-mean":
            return token_loss.mean()
        if mode == "seq-mean-token-sum-norm":
            return token_loss.sum() / token_loss.shape[-1]
        per_seq = token_loss.mean(-1) if mode == "seq-mean-token-mean" else token_loss.sum(-1)
        return per_seq.mean()
    valid = mask if mask.dtype == torch.bool else mask != 0
    m = valid.to(token_loss.dtype)
    # where, not token_loss * m: a NaN / inf at a masked position must not reach the sum.
    masked = token_loss * m if finite_outside else torch.where(valid, token_loss, 0.0)
    if mode == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / token_loss.shape[-1]
    tokens_per_seq = m.sum(-1)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / tokens_per_seq.clamp(min=1.0)
    else:
        per_seq = masked.sum(-1)
    has_tokens = (tokens_per_seq > 0).to(token_loss.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def _clip_bounds(config: LossConfig) -> dict[str, Any]:
    """The clip keyword arguments of :func:`clipped_objective` and :func:`clip_flags`."""
    return {
        "eps_low": config.eps_low,
        "eps_high": config.eps_high,
        "dual_clip_c": config.dual_clip_c,
    }


def _as_2d(x: Tensor) -> Tensor:
    return x.unsqueeze(-1) if x.ndim == 1 else x


def _validate(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    entropy: Tensor | None,
    old_entropy: Tensor | None,
    mask: Tensor | None,
    config: LossConfig,
    kl: Tensor | None = None,
) -> None:
    if not isinstance(config, LossConfig):
        raise ValueError(f"config must be a LossConfig, got {type(config).__name__}")
    tensors: dict[str, Tensor | None] = {
        "log_prob": log_prob,
        "old_log_prob": old_log_prob,
        "advantages": advantages,
        "entropy": entropy,
        "old_entropy": old_entropy,
        "mask": mask,
        "kl": kl,
    }
    for name, item in tensors.items():
        if item is not None and not isinstance(item, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(item).__name__}")
    shape = tuple(log_prob.shape)
    if log_prob.ndim not in (1, 2):
        raise ValueError(f"log_prob must have shape (B,) or (B, T), got {shape}")
    if tuple(old_log_prob.shape) != shape:
        raise ValueError(
            f"old_log_prob must have the shape of log_prob {shape}, got {tuple(old_log_prob.shape)}"
        )
    adv_ok = tuple(advantages.shape) in {shape, shape[:1], (shape[0], 1)}
    if not adv_ok:
        raise ValueError(
            f"advantages must have shape {shape}, ({shape[0]},) or ({shape[0]}, 1) for "
            f"log_prob of shape {shape}, got {tuple(advantages.shape)}"
        )
    if mask is not None and tuple(mask.shape) != shape:
        raise ValueError(f"mask must have the shape of log_prob {shape}, got {tuple(mask.shape)}")
    for name, value in (("entropy", entropy), ("old_entropy", old_entropy), ("kl", kl)):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(
                f"{name} must have the shape of log_prob {shape}, got {tuple(value.shape)}"
            )
    if (entropy is None or old_entropy is None) and config.needs_entropies:
        # the message is built only here: formatting it on every call would cost the hot path
        gate = config.gate
        if isinstance(gate, HighEntropy) and entropy is None:
            raise ValueError(
                "the HighEntropy gate ranks tokens by their current entropy, but entropy is None"
            )
        what = (
            f"ERC (config.erc={config.erc})"
            if config.erc is not None
            else f"the equal-step control (equal_step={config.equal_step})"
            if config.equal_step is not None
            else "the matched random control (RandomMask(match=...))"
            if isinstance(gate, RandomMask) and gate.match is not None
            else None
        )
        if what is not None:
            missing = [
                n for n, v in (("entropy", entropy), ("old_entropy", old_entropy)) if v is None
            ]
            raise ValueError(
                f"{what} is on but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} None: pass the current and old "
                "per-token entropies, or turn it off"
            )
    if (entropy is None) != (old_entropy is None):
        raise ValueError("entropy and old_entropy must be given together (or both None)")


def _coefficient(name: str, runtime: float | None, fixed: float) -> float | None:
    """The coefficient a regulariser applies this call (None: the regulariser is off)."""
    if runtime is None:
        return fixed if fixed != 0 else None
    if isinstance(runtime, bool) or not isinstance(runtime, int | float):
        raise TypeError(f"{name} must be a number or None, got {type(runtime).__name__}")
    if not 0 <= runtime < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={runtime}")
    return float(runtime)


def _token_mean(x: Tensor, tokens: Tensor | None) -> Tensor:
    """Mean of ``x`` over ``tokens`` (all when None); 0 when empty; NaN outside never leaks."""
    if tokens is None:
        return x.mean()
    return torch.where(tokens, x, 0.0).sum() / tokens.sum().clamp(min=1)


def _apply_gate(
    gate: TokenGate,
    token_loss: Tensor,
    *,
    log_prob: Tensor,
    log_ratio: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    valid: Tensor | None,
    entropy: Tensor | None,
    old_entropy: Tensor | None,
    config: LossConfig,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """The token gate's per-token loss and the tokens it acted on."""
    if isinstance(gate, HighEntropy):
        assert entropy is not None
        keep = high_entropy_keep(entropy, valid, gate.quantile)
        # TRL multiplies the per-token loss by its mask: no gradient, value 0, same denominator
        return token_loss * keep.to(token_loss.dtype), ~keep if valid is None else valid & ~keep
    if isinstance(gate, RandomMask):
        n_valid = (
            torch.tensor(token_loss.numel(), device=token_loss.device)
            if valid is None
            else valid.sum()
        )
        if gate.match is not None:
            assert entropy is not None and old_entropy is not None
            count = (
                n_valid
                - erc_keep_mask(entropy_ratio(entropy, old_entropy), valid, gate.match).sum()
            )
        else:
            assert gate.share is not None
            count = torch.floor(gate.share * n_valid + 0.5).to(n_valid.dtype)
        drawn = random_mask(valid, count, token_loss.shape, generator)
        # ERC's semantics: the value stays, the gradient stops
        return _stop_gradient_outside(token_loss, ~drawn), drawn
    all_valid = torch.ones_like(token_loss, dtype=torch.bool) if valid is None else valid
    if isinstance(gate, ClipCov):
        with torch.no_grad():
            bounded = ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
            clipped = (
                (-advantages * bounded > -advantages * ratio)
                if config.clip != "none"
                else torch.zeros_like(all_valid)
            )
        drawn = clip_cov_mask(log_prob, advantages, all_valid, clipped, gate, generator)
        return torch.where(drawn, 0.0, token_loss), drawn
    chosen = kl_cov_mask(log_prob, advantages, all_valid, gate)
    return torch.where(chosen, token_loss + gate.coef * log_ratio.abs(), token_loss), chosen


def policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    entropy: Tensor | None = None,
    old_entropy: Tensor | None = None,
    mask: Tensor | None = None,
    config: LossConfig,
    metrics: bool = True,
    kl: Tensor | None = None,
    entropy_coef: float | None = None,
    kl_coef: float | None = None,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Clipped policy-gradient loss with optional Entropy Ratio Clipping and the rival methods.

    The math is in the module docstring; ``config`` chooses the clip variant, dual-clip, the ERC
    band, the token gate, the regularisers and the aggregation. Half-precision inputs are
    computed in fp32 (gradients flow back in the input dtype).

    Args:
        log_prob: ``(B,)`` (one state per sample, as in SB3) or ``(B, T)`` (tokens) log-probs of
            the taken actions under the current policy (differentiable).
        old_log_prob: same shape, under the policy that collected the batch.
        advantages: ``(B, T)``, ``(B,)`` or ``(B, 1)``; the last two are broadcast over tokens.
        entropy: current full-distribution entropy per state, same shape as ``log_prob``. Needed
            for ERC, the matched random control, the equal-step control and the high-entropy
            gate, and (differentiable) for the entropy bonus; also gives the entropy metrics.
            Entropies are ``>= 0``: a valid token below ``-NEGATIVE_ENTROPY_TOL`` (an entropy
            loss ``-H`` passed by mistake) is refused when the metrics are reduced, here or in
            :func:`loss_metrics` (no extra host sync).
        old_entropy: the same under the old policy. A zero old entropy (a deterministic old
            policy at that state) is allowed: the ratio is then ``(H + 1e-8) / 1e-8``, so ERC
            stops the token's gradient once its entropy exceeds ``(high - 1) * 1e-8``.
        mask: valid tokens (bool or 0/1), same shape as ``log_prob``; None means all valid.
        config: the :class:`LossConfig`.
        metrics: compute ``LossOutput.metrics`` now (one host sync). Pass False inside a loop of
            mini-batch steps and reduce the collected ``LossOutput.stats`` once with
            :func:`loss_metrics`.
        kl: per-state ``KL(pi_old || pi)`` of the full distributions, same shape, differentiable
            (``config.kl_estimator="exact"`` with a KL penalty).
        entropy_coef: the entropy-bonus coefficient of this call (an adaptive controller's),
            overriding ``config.entropy_coef``; None: the config's.
        kl_coef: the same for the KL penalty.
        generator: random source of :class:`RandomMask` and :class:`ClipCov`; None: the global
            RNG (verl's ``torch.randperm`` for Clip-Cov).

    Returns:
        :class:`LossOutput` with the scalar ``loss``, ``metrics``, ``stats`` and ``token_loss``.

    Raises:
        ValueError: on mismatched shapes, a method on without the tensors it needs, or (with
            ``metrics``) a negative entropy.

    Example:
        >>> cfg = LossConfig.dapo(erc=ERCConfig(0.95, 1.05))
        >>> lp = torch.randn(4, 16, requires_grad=True)
        >>> h = torch.rand(4, 16)
        >>> out = policy_loss(lp, lp.detach(), torch.randn(4), entropy=h, old_entropy=h,
        ...                   config=cfg)
        >>> out.loss.backward()
    """
    _validate(log_prob, old_log_prob, advantages, entropy, old_entropy, mask, config, kl)
    compute = torch.promote_types(log_prob.dtype, torch.float32)
    lp = _as_2d(log_prob).to(compute)
    old_lp = _as_2d(old_log_prob).detach().to(compute)
    adv = _as_2d(advantages.detach().to(compute))
    valid = None if mask is None else _as_2d(mask).bool()

    log_ratio = lp - old_lp
    if valid is not None:
        # Select, never multiply: a NaN or inf at a masked-out position (a padded token whose
        # logits were all -inf, a stale old log-prob, the NaN advantage of an empty sequence)
        # would survive ``x * 0`` and poison the loss and, through ``0 * NaN`` in the backward
        # pass, the gradient. Selected to 0 here, every masked token's loss and gradient are
        # finite whatever it held, and the mask multiplication in the aggregation removes them.
        log_ratio = torch.where(valid, log_ratio, 0.0)
        # A per-sequence advantage only reaches masked tokens of its own row, so only rows
        # without any valid token need it replaced (cheaper than a (B, T) select).
        row_valid = valid if adv.shape == valid.shape else valid.any(-1, keepdim=True)
        adv = torch.where(row_valid, adv, 0.0)
    adv = adv.expand_as(lp)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    outside = None
    if config.clip in DPPO_VARIANTS:
        # DPPO's loss is in logp itself, so masked positions are selected to finite values
        lp_v = lp if valid is None else torch.where(valid, lp, 0.0)
        old_v = old_lp if valid is None else torch.where(valid, old_lp, 0.0)
        token_loss, inside = dppo_objective(
            lp_v,
            old_v,
            ratio,
            adv,
            divergence="tv" if config.clip == "dppo-tv" else "kl",
            eps_low=config.eps_low,
            eps_high=config.eps_high,
            ratio_cap=config.ratio_cap,
        )
        outside = ~inside if valid is None else valid & ~inside
    else:
        token_loss = clipped_objective(ratio, adv, clip=config.clip, **_clip_bounds(config))

    h = None if entropy is None else _as_2d(entropy).detach()
    h_old = None if old_entropy is None else _as_2d(old_entropy).detach()
    gate = None
    if config.gate is not None:
        token_loss, gate = _apply_gate(
            config.gate,
            token_loss,
            log_prob=lp,
            log_ratio=log_ratio,
            ratio=ratio,
            advantages=adv,
            valid=valid,
            entropy=h,
            old_entropy=h_old,
            config=config,
            generator=generator,
        )
    keep = rho = None
    if config.erc is not None and h is not None and h_old is not None:
        rho = entropy_ratio(h, h_old)
        keep = erc_keep_mask(rho, valid, config.erc)
        token_loss = _stop_gradient_outside(token_loss, keep)

    # Masked tokens' losses are finite here (see above): multiplying by the mask is enough.
    loss = pg_loss = _aggregate(token_loss, valid, config.aggregation, finite_outside=True)
    step_scale = bonus_entropy = kl_mean = per_token_kl = None
    if config.equal_step is not None and h is not None and h_old is not None:
        would_keep = erc_keep_mask(entropy_ratio(h, h_old), valid, config.equal_step)
        n = torch.as_tensor(
            would_keep.numel() if valid is None else valid.sum(), dtype=compute, device=lp.device
        )
        step_scale = torch.where(n > 0, would_keep.sum().to(compute) / n.clamp(min=1), 1.0)
    c_h = _coefficient("entropy_coef", entropy_coef, config.entropy_coef)
    if c_h is not None:
        if entropy is None:
            raise ValueError(
                "the entropy bonus (entropy_coef) needs the current entropy: pass entropy "
                "(differentiable, e.g. logprob_and_entropy(..., entropy_grad=True))"
            )
        if c_h != 0 and torch.is_grad_enabled() and not entropy.requires_grad:
            raise ValueError(
                f"the entropy bonus (entropy_coef={c_h}) needs a differentiable entropy, got one "
                "without gradient: compute it with entropy_grad=True"
            )
        bonus_tokens = valid
        if isinstance(config.gate, HighEntropy):
            assert gate is not None  # the gate's acted-on tokens are the valid low-entropy ones
            bonus_tokens = ~gate if valid is None else valid & ~gate
        mean_h = _token_mean(_as_2d(entropy).to(compute), bonus_tokens)
        loss = loss - c_h * mean_h
        bonus_entropy = mean_h.detach()
    c_kl = _coefficient("kl_coef", kl_coef, config.kl_coef)
    if c_kl is not None:
        if config.kl_estimator == "exact":
            if kl is None:
                raise ValueError(
                    f"the KL penalty (kl_coef={c_kl}) with kl_estimator='exact' needs kl, the "
                    "per-state KL(pi_old || pi) of the full distributions; pass it or use "
                    "kl_estimator='k3'"
                )
            per_token_kl = _as_2d(kl).to(compute)
            if valid is not None:
                per_token_kl = torch.where(valid, per_token_kl, 0.0)
        else:
            per_token_kl = (ratio - 1.0) - log_ratio
        kl_term = _token_mean(per_token_kl, valid)
        loss = loss + c_kl * kl_term
        kl_mean = kl_term.detach()
    stats = LossStats(
        loss=pg_loss.detach(),
        log_ratio=log_ratio.detach(),
        advantages=adv,
        valid=valid,
        entropy=h,
        old_entropy=h_old,
        config=config,
        rho=rho,
        keep=keep,
        gate=gate,
        outside=outside,
        kl=None if per_token_kl is None else per_token_kl.detach(),
        entropy_coef=c_h,
        kl_coef=c_kl,
        step_scale=step_scale,
    )
    return LossOutput(
        loss=loss,
        metrics=loss_metrics([stats]) if metrics else {},
        stats=stats,
        token_loss=token_loss,
        erc_keep=keep,
        gate_mask=gate,
        step_scale=step_scale,
        bonus_entropy=bonus_entropy,
        kl_mean=kl_mean,
    )


def _cat(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
    if all(p.shape[1:] == parts[0].shape[1:] for p in parts):  # one cat, no per-part work
        return torch.cat(parts).reshape(-1).to(dtype)
    return torch.cat([p.reshape(-1).to(dtype) for p in parts])


def loss_metrics(stats: Sequence[LossStats]) -> dict[str, float]:
    """Metrics of one or several :func:`policy_loss` calls, with a single host sync.

    Several calls (the mini-batches of one update) are reduced together: fractions and means are
    token-weighted over all their valid tokens, min / max run over all of them, and ``pg_loss`` is
    the mean of the per-call losses. The keys are documented in ``docs/metrics.md``.

    Args:
        stats: ``LossOutput.stats`` of each call; all must share one :class:`LossConfig` and agree
            on whether entropies were given.

    Returns:
        ``dict[str, float]``. Fractions are 0 when no token is valid; conditional means are NaN
        when their set is empty.
    """
    if not stats:
        raise ValueError("loss_metrics needs at least one LossStats")
    config = stats[0].config
    if any(s.config != config for s in stats):
        raise ValueError("loss_metrics: all LossStats must come from the same LossConfig")
    with_entropy = stats[0].entropy is not None and stats[0].old_entropy is not None
    if any((s.entropy is not None and s.old_entropy is not None) != with_entropy for s in stats):
        raise ValueError("loss_metrics: either every call or none must have entropies")
    dtype = torch.promote_types(stats[0].log_ratio.dtype, torch.float32)
    with torch.no_grad():
        log_ratio = _cat([s.log_ratio for s in stats], dtype)
        adv = _cat([s.advantages for s in stats], dtype)
        if all(s.valid is None for s in stats):
            valid = torch.ones_like(log_ratio, dtype=torch.bool)
        else:
            valid = torch.cat(
                [
                    (
                        s.valid
                        if s.valid is not None
                        else torch.ones_like(s.log_ratio, dtype=torch.bool)
                    ).reshape(-1)
                    for s in stats
                ]
            )
        ratio = torch.exp(log_ratio)
        v = valid.to(dtype)
        n = v.sum()
        n1 = n.clamp(min=1.0)
        nan = torch.full_like(n, float("nan"))
        if config.clip in DPPO_VARIANTS:
            flags = _dppo_flags(stats, ratio, adv, config.ratio_cap)
        else:
            flags = clip_flags(ratio, adv, **_clip_bounds(config))
            if config.clip == "none":  # no clip bound exists (dual-clip may)
                flags["clip_low"] = flags["clip_high"] = torch.zeros_like(valid)
        indicators = {
            "clip_fraction": flags["clip_low"] | flags["clip_high"],
            "clip_fraction_low": flags["clip_low"],
            "clip_fraction_high": flags["clip_high"],
            "dual_clip_fraction": flags["dual_clip"],
        }
        sums = {
            "approx_kl": (ratio - 1.0) - log_ratio,
            "ppo_kl": -log_ratio,
            "ratio_mean": ratio,
        }
        extra: dict[str, Tensor] = {}
        entropy_names: list[str] = []
        entropy_sums: Tensor | None = None
        lowest: Tensor | None = None
        if with_entropy:
            h = _cat([s.entropy for s in stats if s.entropy is not None], dtype)
            h_old = _cat([s.old_entropy for s in stats if s.old_entropy is not None], dtype)
            # the lowest valid entropy: a check, not a metric, riding on the same host sync
            lowest = torch.where(valid, torch.minimum(h, h_old), 0.0).min().reshape(1)
            if all(s.rho is not None for s in stats):
                rho = _cat([s.rho for s in stats if s.rho is not None], dtype)
            else:
                rho = entropy_ratio(h, h_old)
            if config.erc is not None:
                # The same mask the loss applied: a NaN ratio fails both strict comparisons, so
                # its gradient was stopped and it counts as clipped (on neither side).
                keeps = [s.keep for s in stats if s.keep is not None]
                if len(keeps) == len(stats):
                    keep = _cat(keeps, torch.bool) if len(keeps) > 1 else keeps[0].reshape(-1)
                else:
                    keep = erc_keep_mask(rho, valid, config.erc)
                clipped = valid ^ keep  # keep is a subset of valid
                below = (rho <= config.erc.low) & valid
                above = (rho >= config.erc.high) & valid
            else:
                keep = valid
                clipped = below = above = torch.zeros_like(valid)
            indicators |= {
                "erc_clip_fraction": clipped,
                "erc_clip_fraction_low": below,
                "erc_clip_fraction_high": above,
            }
            entropy_names = ["entropy_ratio_mean", "entropy_mean", "entropy_old_mean"]
            # Selected, not multiplied by the mask: the loss never sanitises entropies, so a NaN
            # at a masked position must be kept out here (log-ratios and advantages are 0 there).
            rho_h_h_old = torch.where(valid, torch.stack([rho, h, h_old]), 0.0)
            entropy_sums = rho_h_h_old.sum(-1)
            h_old_valid = rho_h_h_old[2]
            clipped_w = clipped.to(dtype)
            big = torch.finfo(dtype).max
            c_clip = clipped_w.sum()
            c_kept = n - c_clip
            extra = {
                "entropy_ratio_min": torch.where(n > 0, torch.where(valid, rho, big).min(), nan),
                "entropy_ratio_max": torch.where(n > 0, torch.where(valid, rho, -big).max(), nan),
                "erc_clipped_entropy_old_mean": torch.where(
                    c_clip > 0, (h_old_valid * clipped_w).sum() / c_clip.clamp(min=1.0), nan
                ),
                # kept tokens have finite entropies; a NaN one is clipped and must not leak here
                "erc_kept_entropy_old_mean": torch.where(
                    c_kept > 0,
                    torch.where(keep, h_old_valid, 0.0).sum() / c_kept.clamp(min=1.0),
                    nan,
                ),
            }
        scalars: dict[str, float] = {}
        first = stats[0]  # a per-call (adaptive) coefficient is passed to every call or none
        if _has_methods(config) or first.entropy_coef is not None or first.kl_coef is not None:
            _method_metrics(stats, dtype, indicators, sums, extra, scalars)
        fractions = (torch.stack(list(indicators.values())) & valid).to(dtype).sum(-1) / n1
        means = (torch.stack(list(sums.values())) * v).sum(-1) / n1
        if entropy_sums is not None:
            means = torch.cat([means, entropy_sums / n1])
        pg_loss = torch.stack([s.loss.reshape(()).to(dtype) for s in stats]).mean()
        flat = torch.cat(
            [
                pg_loss.reshape(1),
                fractions,
                means,
                torch.stack(list(extra.values())) if extra else fractions[:0],
                lowest if lowest is not None else fractions[:0],
            ]
        )
        names = ["pg_loss", *indicators, *sums, *entropy_names, *extra]
        if flat.is_meta:  # shape inference: the tensors hold no values to report
            values = [math.nan] * flat.numel()
        else:
            values = flat.to(torch.float64).cpu().tolist()
        low = values.pop() if lowest is not None else 0.0
        if low < -NEGATIVE_ENTROPY_TOL:
            raise ValueError(
                f"entropy and old_entropy must be entropies (>= 0), got {low:.4g} at a valid "
                "token: pass H of the full action distribution, not an entropy loss (-H)"
            )
        out = dict(zip(names, values, strict=True))
    return out | scalars if scalars else out


#: The metric naming the share of valid tokens each token gate acted on (beside ``gate_fraction``).
GATE_METRICS: dict[type, str] = {
    RandomMask: "random_mask_fraction",
    ClipCov: "clip_cov_fraction",
    KLCov: "kl_cov_fraction",
    HighEntropy: "entropy_gate_fraction",
}


def _has_methods(config: LossConfig) -> bool:
    return (
        config.gate is not None
        or config.entropy_coef != 0
        or config.kl_coef != 0
        or config.equal_step is not None
    )


def _dppo_flags(
    stats: Sequence[LossStats], ratio: Tensor, adv: Tensor, cap: float | None
) -> dict[str, Tensor]:
    """DPPO's "clip took effect": outside the trust region, per advantage side; the weight cap."""
    outside = _cat([s.outside for s in stats if s.outside is not None], torch.bool)
    positive = adv > 0
    capped = (
        (ratio > cap) & ~outside if cap is not None else torch.zeros_like(outside, dtype=torch.bool)
    )
    return {"clip_low": outside & ~positive, "clip_high": outside & positive, "dual_clip": capped}


def _method_metrics(
    stats: Sequence[LossStats],
    dtype: torch.dtype,
    indicators: dict[str, Tensor],
    sums: dict[str, Tensor],
    extra: dict[str, Tensor],
    scalars: dict[str, float],
) -> None:
    """Add the rival methods' metrics (``docs/metrics.md``) to :func:`loss_metrics`' parts."""
    config = stats[0].config
    if config.gate is not None and all(s.gate is not None for s in stats):
        acted = _cat([s.gate for s in stats if s.gate is not None], torch.bool)
        indicators["gate_fraction"] = acted
        indicators[GATE_METRICS[type(config.gate)]] = acted
    if all(s.kl is not None for s in stats):
        sums["kl_mean"] = _cat([s.kl for s in stats if s.kl is not None], dtype)
    if all(s.step_scale is not None for s in stats):
        extra["equal_step_scale"] = torch.stack(
            [s.step_scale.reshape(()).to(dtype) for s in stats if s.step_scale is not None]
        ).mean()
    for name in ("entropy_coef", "kl_coef"):
        values = [getattr(s, name) for s in stats]
        if all(v is not None for v in values):
            scalars[name] = sum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# The rival methods, baselines and controls by name (docs/rivals.md). Each entry is the flat
# trainer settings it sets -- fields of erc_gym.methods.MethodSettings (loss and trainer parts)
# and the ERC band -- which BanditConfig, TrainerConfig and ERCPPO all accept, so an experiment
# config can list methods by name. Entries other than "erc" switch ERC off explicitly (ERCPPO's
# default band is on). Ratios and coefficients are the engines' / papers' defaults; choose them
# per scale where the docs say so.
# ---------------------------------------------------------------------------------------------

_NO_ERC: dict[str, Any] = {"erc_low": None, "erc_high": None}
_CONTROL_BAND: dict[str, Any] = {"control_low": 0.95, "control_high": 1.05}

#: Method name -> the settings it sets (on top of a recipe: ``ppo``, ``dapo``, ``gppo``).
METHODS: dict[str, dict[str, Any]] = {
    "base": {**_NO_ERC},
    "erc": {"erc_low": 0.95, "erc_high": 1.05},
    "random-matched": {**_NO_ERC, **_CONTROL_BAND, "random_mask_matched": True},
    "random": {**_NO_ERC, "random_mask_share": 0.2},
    "equal-step": {**_NO_ERC, **_CONTROL_BAND, "equal_step": True},
    "clip-cov": {**_NO_ERC, "clip_cov_ratio": 2e-4},
    "kl-cov": {**_NO_ERC, "clip_variant": "none", "kl_cov_ratio": 2e-4},
    "high-entropy": {**_NO_ERC, "top_entropy_quantile": 0.2},
    "entropy-bonus": {**_NO_ERC, "ent_coef": 0.01},
    "entropy-adaptive": {**_NO_ERC, "entropy_target": 0.2},
    "kl-penalty": {**_NO_ERC, "kl_coef": 0.1},
    "kl-adaptive": {**_NO_ERC, "kl_coef": 1.0, "kl_target": 0.01},
    "dppo-tv": {**_NO_ERC, "clip_variant": "dppo-tv"},
    "dppo-kl": {**_NO_ERC, "clip_variant": "dppo-kl"},
    "target-kl": {**_NO_ERC, "target_kl": 0.02},
}


def method_settings(name: str, **overrides: Any) -> dict[str, Any]:
    """The settings of the method ``name`` (:data:`METHODS`), with ``overrides`` on top.

    Example:
        >>> method_settings("clip-cov", clip_cov_ratio=0.05)
        {'erc_low': None, 'erc_high': None, 'clip_cov_ratio': 0.05}

    Raises:
        ValueError: naming the known methods if ``name`` is not one.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return {**METHODS[name], **overrides}
