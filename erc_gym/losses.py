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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "ENTROPY_METRIC_KEYS",
    "LOG_RATIO_CLAMP",
    "LOSS_METRIC_KEYS",
    "RECIPES",
    "AggregationMode",
    "ClipVariant",
    "ERCConfig",
    "LossConfig",
    "LossOutput",
    "LossStats",
    "aggregate",
    "clip_flags",
    "clipped_objective",
    "entropy_ratio",
    "erc_keep_mask",
    "loss_metrics",
    "policy_loss",
    "sb3_recipe_kwargs",
]

#: Clip variant of :class:`LossConfig`: ``"ppo"`` (the clip stops the gradient) or ``"gppo"``
#: (gradient-preserving clip).
ClipVariant = Literal["ppo", "gppo"]
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


@dataclass(frozen=True)
class LossConfig:
    """Static configuration of :func:`policy_loss`.

    Args:
        clip: ``"ppo"`` (standard clip; DAPO clip-higher when ``eps_high > eps_low``) or
            ``"gppo"`` (gradient-preserving clip).
        eps_low: lower clip range, the ratio is bounded below by ``1 - eps_low``.
        eps_high: upper clip range, the ratio is bounded above by ``1 + eps_high``.
        dual_clip_c: dual-clip constant ``c > 1`` for negative advantages, or None (off).
        erc: entropy-ratio band, or None (ERC off).
        aggregation: how the per-token loss matrix becomes a scalar (see :func:`aggregate`).

    Use the constructors :meth:`ppo`, :meth:`dapo` and :meth:`gppo` for the published recipes.
    """

    clip: ClipVariant = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = None
    erc: ERCConfig | None = None
    aggregation: AggregationMode = "token-mean"

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


@dataclass
class LossStats:
    """Detached tensors of one :func:`policy_loss` call, from which metrics are computed.

    Kept so that a trainer taking many mini-batch steps can reduce the metrics of the whole update
    with one call of :func:`loss_metrics` (one host sync per update, no per-step metric work).

    Attributes:
        loss: the aggregated loss, detached, shape ``()``.
        log_ratio: clamped ``logp - logp_old``, ``(B, T)``.
        advantages: advantages broadcast to ``(B, T)``.
        valid: boolean mask ``(B, T)``, or None (all valid).
        entropy: current entropy ``(B, T)`` or None.
        old_entropy: old entropy ``(B, T)`` or None.
        config: the :class:`LossConfig` used.
        rho: the entropy ratio ``(B, T)`` if the loss already computed it (ERC on), else None.
        keep: ERC's keep-mask ``(B, T)`` as the loss applied it (ERC on), else None.
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
    """

    loss: Tensor
    metrics: dict[str, float]
    stats: LossStats
    token_loss: Tensor
    erc_keep: Tensor | None = None


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
        clip: ``"ppo"`` or ``"gppo"``.
        eps_low: lower clip range.
        eps_high: upper clip range.
        dual_clip_c: dual-clip constant or None.

    Returns:
        The loss, same shape as ``ratio``. :func:`clip_flags` tells where each bound is active.
    """
    lower, upper = 1.0 - eps_low, 1.0 + eps_high
    neg_adv = -advantages
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
    for name, value in (("entropy", entropy), ("old_entropy", old_entropy)):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(
                f"{name} must have the shape of log_prob {shape}, got {tuple(value.shape)}"
            )
    if config.erc is not None and (entropy is None or old_entropy is None):
        missing = [n for n, v in (("entropy", entropy), ("old_entropy", old_entropy)) if v is None]
        raise ValueError(
            f"ERC is on (config.erc={config.erc}) but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} None: pass the current and old per-token "
            "entropies, or set erc=None"
        )
    if (entropy is None) != (old_entropy is None):
        raise ValueError("entropy and old_entropy must be given together (or both None)")


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
) -> LossOutput:
    """Clipped policy-gradient loss with optional Entropy Ratio Clipping.

    The math is in the module docstring; ``config`` chooses the clip variant, dual-clip, the ERC
    band and the aggregation. Half-precision inputs are computed in fp32 (gradients flow back in
    the input dtype).

    Args:
        log_prob: ``(B,)`` (one state per sample, as in SB3) or ``(B, T)`` (tokens) log-probs of
            the taken actions under the current policy (differentiable).
        old_log_prob: same shape, under the policy that collected the batch.
        advantages: ``(B, T)``, ``(B,)`` or ``(B, 1)``; the last two are broadcast over tokens.
        entropy: current full-distribution entropy per state, same shape as ``log_prob``. Needed
            for ERC; also gives the entropy metrics when ERC is off.
        old_entropy: the same under the old policy.
        mask: valid tokens (bool or 0/1), same shape as ``log_prob``; None means all valid.
        config: the :class:`LossConfig`.
        metrics: compute ``LossOutput.metrics`` now (one host sync). Pass False inside a loop of
            mini-batch steps and reduce the collected ``LossOutput.stats`` once with
            :func:`loss_metrics`.

    Returns:
        :class:`LossOutput` with the scalar ``loss``, ``metrics``, ``stats`` and ``token_loss``.

    Raises:
        ValueError: on mismatched shapes, or ERC on without both entropies.

    Example:
        >>> cfg = LossConfig.dapo(erc=ERCConfig(0.95, 1.05))
        >>> lp = torch.randn(4, 16, requires_grad=True)
        >>> h = torch.rand(4, 16)
        >>> out = policy_loss(lp, lp.detach(), torch.randn(4), entropy=h, old_entropy=h,
        ...                   config=cfg)
        >>> out.loss.backward()
    """
    _validate(log_prob, old_log_prob, advantages, entropy, old_entropy, mask, config)
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
    token_loss = clipped_objective(
        torch.exp(log_ratio),
        adv,
        clip=config.clip,
        eps_low=config.eps_low,
        eps_high=config.eps_high,
        dual_clip_c=config.dual_clip_c,
    )

    h = None if entropy is None else _as_2d(entropy).detach()
    h_old = None if old_entropy is None else _as_2d(old_entropy).detach()
    keep = rho = None
    if config.erc is not None and h is not None and h_old is not None:
        rho = entropy_ratio(h, h_old)
        keep = erc_keep_mask(rho, valid, config.erc)
        token_loss = _stop_gradient_outside(token_loss, keep)

    # Masked tokens' losses are finite here (see above): multiplying by the mask is enough.
    loss = _aggregate(token_loss, valid, config.aggregation, finite_outside=True)
    stats = LossStats(
        loss=loss.detach(),
        log_ratio=log_ratio.detach(),
        advantages=adv,
        valid=valid,
        entropy=h,
        old_entropy=h_old,
        config=config,
        rho=rho,
        keep=keep,
    )
    return LossOutput(
        loss=loss,
        metrics=loss_metrics([stats]) if metrics else {},
        stats=stats,
        token_loss=token_loss,
        erc_keep=keep,
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
        flags = clip_flags(
            ratio,
            adv,
            eps_low=config.eps_low,
            eps_high=config.eps_high,
            dual_clip_c=config.dual_clip_c,
        )
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
        if with_entropy:
            h = _cat([s.entropy for s in stats if s.entropy is not None], dtype)
            h_old = _cat([s.old_entropy for s in stats if s.old_entropy is not None], dtype)
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
            ]
        )
        names = ["pg_loss", *indicators, *sums, *entropy_names, *extra]
        return dict(zip(names, flat.to(torch.float64).cpu().tolist(), strict=True))
