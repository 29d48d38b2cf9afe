"""Entropy Ratio Clipping for TRL's ``GRPOTrainer`` (``pip install "erc-gym[trl]"``).

:class:`ERCGRPOConfig` adds four settings to TRL's ``GRPOConfig``; :class:`ERCGRPOTrainer` is a
``GRPOTrainer`` that applies ERC (Su et al. 2025, arXiv 2512.05591) without copying any of TRL's
loss code:

* **Old entropies.** H_old is computed inside TRL's own no-grad old-log-prob pass (no extra
  forward), over the completion tokens, at the sampling temperature, and travels with the batch
  under the key ``old_per_token_entropy`` (TRL shuffles and splits every tensor of that dict).
* **Stop-gradient.** In the training pass the current log-probs become
  ``where(keep, logp, sg(logp))`` with ``keep`` from :func:`erc_gym.losses.erc_keep_mask`. In
  every supported TRL loss type token ``t``'s loss depends on the parameters only through
  ``logp_t``, so this is exactly ``where(keep, l, sg(l))``: forward values, TRL's aggregation and
  its denominators are unchanged and only the gradient of out-of-band tokens is stopped.
* **GPPO** (``erc_clip="gppo"``, Klear-Reasoner arXiv 2508.07629). TRL's clamp passes no
  gradient where it is active. The trainer hands TRL advantages of shape ``(B, T)`` (same
  values) whose backward adds, per token, the difference between the gradients of
  :func:`erc_gym.losses.clipped_objective` with ``clip="gppo"`` and ``clip="ppo"``, weighted by
  the aggregation weight TRL's own loss gave that token (read from the advantage's gradient, which
  is ``-w_t * bound`` exactly where the clip is active). Forward values and TRL's metrics stay
  TRL's.
* **Exact entropy** (``erc_entropy="exact"``). TRL 1.16 projects hidden states through a fused LM
  head and computes entropy as ``logsumexp(z) - sum(p z)``, which loses accuracy at the low
  entropies ERC clips most (``docs/scale_out.md``). A forward hook on the backbone takes the final
  hidden states of the same forward pass and computes the entropy with :mod:`erc_gym.entropy`
  (:func:`erc_gym.entropy.linear_logprob_and_entropy`: no gradient, the logits of one chunk of
  tokens at a time). TRL's own entropies (and their
  gradient, for ``entropy_coef != 0``) are left as they are for TRL's uses.

What cannot be done exactly is refused with a ``ValueError`` naming the setting: sequence-level
importance sampling, loss types whose token loss is not token-local (``luspo``, ``vespo``), a KL
term (``beta != 0``: the stop-gradient would also stop the KL gradient of clipped tokens), and
settings where every sample is used on-policy (then TRL skips the old pass and ERC cannot act).
The trainer checks these after ``GRPOTrainer``'s own argument checks
(:meth:`ERCGRPOConfig.check_erc_compatible`). Under DeepSpeed ZeRO-3 and FSDP2 the exact entropy
gathers the sharded LM head, and it refuses (naming the engine) to read an empty or sharded one
(``docs/scale_out.md``, "Sharded training").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from erc_gym.entropy import linear_logprob_and_entropy
from erc_gym.losses import ERCConfig, clipped_objective, entropy_ratio, erc_keep_mask, random_mask

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import get_config_model_id, maybe_gather_lm_head_ctx
except ImportError as exc:  # tests/integrations/test_package.py
    raise ImportError('erc_gym.integrations.trl needs TRL: pip install "erc-gym[trl]"') from exc

__all__ = [
    "ERC_METRIC_KEYS",
    "OLD_ENTROPY_KEY",
    "TESTED_TRL",
    "ERCGRPOConfig",
    "ERCGRPOTrainer",
    "check_trl_version",
]

#: TRL versions this adapter is tested against (lower inclusive, upper exclusive). It overrides
#: private GRPOTrainer methods, whose signatures change between minor versions.
TESTED_TRL = ("1.16", "1.17")

#: Batch key of the old policy's per-token entropy, ``(B, T)`` like ``old_per_token_logps``.
OLD_ENTROPY_KEY = "old_per_token_entropy"

#: Metric keys this trainer adds to TRL's, each reduced over all processes (``docs/metrics.md``).
ERC_METRIC_KEYS = (
    "erc_clip_fraction",
    "erc_clip_fraction_low",
    "erc_clip_fraction_high",
    "entropy_old",
    "entropy_ratio_mean",
    "entropy_ratio_min",
    "entropy_ratio_max",
    "erc_clipped_entropy_old_mean",
    "erc_kept_entropy_old_mean",
)

ERCClip = Literal["ppo", "gppo"]
ERCEntropy = Literal["exact", "trl"]

#: TRL loss types whose per-token loss depends on the parameters only through that token's
#: log-prob, so the ERC stop-gradient on ``logp`` is exact.
ERC_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
#: Loss types built on TRL's PPO clip ``-min(r A, clip(r) A)``, the base of GPPO.
GPPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _version_tuple(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def check_trl_version(version: str | None = None) -> None:
    """Raise unless the installed TRL (or ``version``) is in :data:`TESTED_TRL`.

    Raises:
        RuntimeError: naming the installed version and the tested range.
    """
    found = trl.__version__ if version is None else version
    low, high = (_version_tuple(v) for v in TESTED_TRL)
    if not low <= _version_tuple(found)[: len(low)] < high:
        raise RuntimeError(
            f"erc_gym.integrations.trl is tested with trl>={TESTED_TRL[0]},<{TESTED_TRL[1]} but "
            f"trl=={found} is installed; it overrides private GRPOTrainer methods, so install "
            f'the tested range: pip install "erc-gym[trl]"'
        )


@dataclass
class ERCGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus Entropy Ratio Clipping.

    Parameters that control ERC:

        erc_low (`float` or `None`, *optional*, defaults to `None`):
            Lower bound of the entropy ratio ``H_new / H_old`` (strict). `None` (with `erc_high`
            `None`) turns ERC off. The paper uses `0.95`.
        erc_high (`float` or `None`, *optional*, defaults to `None`):
            Upper bound of the entropy ratio (strict). The paper uses `1.05`.
        erc_clip (`str`, *optional*, defaults to `"ppo"`):
            `"ppo"`: TRL's clip (`epsilon`, `epsilon_high`, `delta`) as it is. `"gppo"`: the same
            forward values with a gradient-preserving clip.
        erc_entropy (`str`, *optional*, defaults to `"exact"`):
            `"exact"`: erc_gym's entropy from the final hidden states. `"trl"`: TRL's fused-head
            entropy.
        erc_random_matched (`bool`, *optional*, defaults to `False`):
            The matched random control of ERC: the band is not applied; in each micro-batch the
            gradient of exactly as many valid tokens as it would clip, drawn at random, is
            stopped instead.

    The authors' settings: DAPO+ERC is ``loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
    delta=10, beta=0, erc_low=0.95, erc_high=1.05``; GPPO+ERC the same with ``epsilon_high=0.2``
    and ``erc_clip="gppo"``. ERC needs off-policy mini-batches: ``num_iterations >= 2`` or
    ``steps_per_generation > gradient_accumulation_steps``.

    The ERC fields themselves are validated here; whether they fit TRL's other settings is
    checked by :meth:`check_erc_compatible`, which the trainer runs after TRL's own checks.
    """

    erc_low: float | None = field(
        default=None,
        metadata={
            "help": "Lower bound of the entropy ratio H_new / H_old outside which a token's "
            "gradient is stopped (strict inequality). `None` together with `erc_high=None` turns "
            "ERC off. The ERC paper uses 0.95; a wider band clips fewer tokens and constrains "
            "the drift of the whole distribution less."
        },
    )
    erc_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper bound of the entropy ratio (strict). The ERC paper uses 1.05. Must be "
            "> 1 so that the on-policy ratio 1 is inside the band."
        },
    )
    erc_clip: str = field(
        default="ppo",
        metadata={
            "help": "Clip variant: 'ppo' keeps TRL's clip (`epsilon`, `epsilon_high`, `delta`) "
            "unchanged; 'gppo' keeps its forward values but lets clipped tokens pass gradient "
            "scaled by the clip bound (GPPO, arXiv 2508.07629), which keeps learning from tokens "
            "PPO would ignore. 'gppo' needs loss_type in grpo, bnpo, dr_grpo, dapo."
        },
    )
    erc_entropy: str = field(
        default="exact",
        metadata={
            "help": "Entropy used for the ratio: 'exact' computes it from the final hidden states "
            "with erc_gym's cancellation-free kernel (accurate at the low entropies ERC clips "
            "most; costs one extra no-grad LM-head projection per pass); 'trl' uses TRL's fused "
            "head entropy (free, but 1e-3..1 relative error below H ~ 1e-2)."
        },
    )

    erc_random_matched: bool = field(
        default=False,
        metadata={
            "help": "The matched random control of ERC (needs erc_low / erc_high): the band is "
            "not applied; instead, in every micro-batch, exactly as many valid completion tokens "
            "as it would clip, drawn at random from torch's global RNG (checkpointed by TRL), "
            "have their gradient stopped. A run against ERC's tells whether ERC's choice of "
            "tokens matters or only how many it stops."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.erc_random_matched and (self.erc_low is None or self.erc_high is None):
            raise ValueError(
                "erc_random_matched=True imitates an ERC band: set erc_low and erc_high "
                f"(e.g. 0.95 and 1.05), got erc_low={self.erc_low}, erc_high={self.erc_high}"
            )
        if (self.erc_low is None) != (self.erc_high is None):
            raise ValueError(
                f"erc_low and erc_high must both be set (ERC on) or both be None (ERC off), got "
                f"erc_low={self.erc_low}, erc_high={self.erc_high}"
            )
        if self.erc_low is not None and self.erc_high is not None:
            try:
                ERCConfig(float(self.erc_low), float(self.erc_high))
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"invalid ERC band erc_low={self.erc_low}, erc_high={self.erc_high}: "
                    f"it must satisfy 0 <= erc_low < 1 < erc_high ({exc})"
                ) from exc
        if self.erc_clip not in get_args(ERCClip):
            raise ValueError(f"erc_clip must be one of {get_args(ERCClip)}, got {self.erc_clip!r}")
        if self.erc_entropy not in get_args(ERCEntropy):
            raise ValueError(
                f"erc_entropy must be one of {get_args(ERCEntropy)}, got {self.erc_entropy!r}"
            )

    @property
    def erc_band(self) -> ERCConfig | None:
        """The ERC band as an :class:`~erc_gym.losses.ERCConfig`, or None when ERC is off."""
        if self.erc_low is None or self.erc_high is None:
            return None
        return ERCConfig(float(self.erc_low), float(self.erc_high))

    def check_erc_compatible(self) -> None:
        """Raise unless ERC (or ``erc_clip="gppo"``) can act exactly with TRL's settings.

        :class:`ERCGRPOTrainer` calls this after ``GRPOTrainer``'s own argument checks, so that a
        setting TRL rejects is reported by TRL first; call it earlier to fail before the model
        is loaded. A no-op when ERC is off and ``erc_clip="ppo"``.

        Raises:
            ValueError: naming the setting (``importance_sampling_level``, ``loss_type``,
                ``beta``, or the on-policy schedule).
        """
        if self.erc_band is None and self.erc_clip != "gppo":
            return
        what = "ERC" if self.erc_band is not None else "erc_clip='gppo'"
        if self.importance_sampling_level != "token":
            raise ValueError(
                f"{what} needs importance_sampling_level='token', got "
                f"importance_sampling_level={self.importance_sampling_level!r}: a sequence-level "
                "ratio couples all tokens of a sequence, so a per-token stop-gradient is not exact"
            )
        supported = GPPO_LOSS_TYPES if self.erc_clip == "gppo" else ERC_LOSS_TYPES
        if self.loss_type not in supported:
            raise ValueError(
                f"{what} with erc_clip={self.erc_clip!r} supports loss_type in {supported}, got "
                f"loss_type={self.loss_type!r}"
            )
        if self.beta != 0.0:
            raise ValueError(
                f"{what} needs beta=0.0, got beta={self.beta}: the ERC stop-gradient on the "
                "log-probs would also stop the KL gradient of clipped tokens (the reference "
                "recipe has no KL term)"
            )
        if self.erc_band is not None:
            generate_every = int(self.steps_per_generation or 1) * self.num_iterations
            if self.gradient_accumulation_steps % generate_every == 0:
                raise ValueError(
                    "ERC needs off-policy mini-batches, but with gradient_accumulation_steps="
                    f"{self.gradient_accumulation_steps}, steps_per_generation="
                    f"{self.steps_per_generation} and num_iterations={self.num_iterations} every "
                    "sample is trained on once, by the policy that generated it (TRL then skips "
                    "its old-log-prob pass and the entropy ratio is always 1). Set "
                    "num_iterations >= 2 or steps_per_generation > gradient_accumulation_steps."
                )


class _GPPOAdvantage(torch.autograd.Function):
    """Advantages for TRL's loss whose backward adds GPPO's gradient to the log-probs.

    Forward: the advantages ``(B, T)`` unchanged. Backward: TRL's loss gives ``dL/dA_t =
    -w_t q_t`` with ``w_t`` TRL's aggregation weight and ``q_t`` the active clip coefficient, so
    ``dL/dA_t * factor_t`` with ``factor_t = A_t d_t / l_t`` (``d_t``: GPPO minus PPO gradient,
    ``l_t``: the PPO loss value) is ``w_t d_t``, the missing gradient of that token.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, adv: Tensor, logp: Tensor, factor: Tensor
    ) -> Tensor:
        ctx.save_for_backward(factor)
        return adv.clone()

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[None, Tensor, None]:
        (factor,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return None, grad * factor, None


def _exact_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    temperature: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """Entropy of ``softmax(transform(hidden @ weight.T + bias) / T)`` per row, without gradient.

    The one place that turns hidden states into exact entropies (``transform``: scale, then
    soft-capping, as TRL's fused head): :func:`erc_gym.entropy.linear_logprob_and_entropy`, which
    holds the logits of one chunk of rows at a time.
    """
    labels = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
    with torch.no_grad():
        _, entropy = linear_logprob_and_entropy(
            hidden.to(weight.dtype),
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
        )
    return entropy


def _head_transform(text_config: Any) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a model's LM head, read from its config as TRL 1.16 does.

    TRL's fused head multiplies the logits by the first of ``logit_scale``,
    ``output_multiplier``, ``lm_head_multiplier`` that is set, else by ``1 / logits_scaling``
    (by ``logits_scaling`` for HyperCLOVA X), then soft-caps with ``final_logit_softcapping``.
    """
    scale = getattr(text_config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text_config, name, None)
    scaling = getattr(text_config, "logits_scaling", None)
    if scale is None and scaling is not None:
        hyperclovax = getattr(text_config, "model_type", None) == "hyperclovax"
        scale = scaling if hyperclovax else 1.0 / scaling
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def _sharding_engine(accelerator: Any, weight: Tensor) -> str:
    """The engine that holds ``weight``, in the words of its documentation (for error messages)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if hasattr(weight, "ds_id") or kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
        return "DeepSpeed ZeRO" + ("" if stage is None else f"-{stage}")
    if isinstance(weight, DTensor) or getattr(accelerator, "is_fsdp2", False):
        return "FSDP2 (fully_shard)"
    if kind == DistributedType.FSDP or getattr(weight, "_fsdp_flattened", False):
        return "FSDP (v1)"
    if accelerator.num_processes > 1:
        return f"DDP ({kind.value})"
    return "a single process"


def _check_head(
    weight: Tensor,
    bias: Tensor | None,
    *,
    vocab: int | None,
    hidden_size: int,
    engine: str,
) -> None:
    """Refuse to compute entropies from an empty or sharded LM head (raises naming ``engine``)."""
    rows = weight.shape[0] if weight.dim() == 2 else None
    whole = (
        not isinstance(weight, DTensor)
        and weight.dim() == 2
        and weight.numel() > 0
        and weight.shape[1] == hidden_size
        and (vocab is None or rows == vocab)
        and (bias is None or (not isinstance(bias, DTensor) and tuple(bias.shape) == (rows,)))
    )
    if not whole:
        want = f"({vocab if vocab is not None else 'vocab'}, {hidden_size})"
        got = f"weight {tuple(weight.shape)}" + (
            "" if bias is None else f", bias {tuple(bias.shape)}"
        )
        raise RuntimeError(
            f"erc_entropy='exact' found the LM head sharded or empty under {engine}: {got}, "
            f"expected weight {want}. The exact entropy needs the whole head in the backbone's "
            "forward pass (gathered for DeepSpeed ZeRO-3 and FSDP2; for FSDP v1 keep the head "
            "in the root FSDP unit, as the transformer auto-wrap policy does); otherwise set "
            "erc_entropy='trl'"
        )


def _masked_sum(x: Tensor, weight: Tensor) -> Tensor:
    return (x * weight).sum()


class ERCGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with Entropy Ratio Clipping; takes the same arguments.

    ``args`` must be an :class:`ERCGRPOConfig`; ``args=None`` builds one with ERC off and TRL's
    defaults (output folder ``<model name>-GRPO``), as ``GRPOTrainer`` does. With ERC off
    (``erc_low=erc_high=None``, ``erc_clip="ppo"``) it trains exactly like ``GRPOTrainer`` and
    still logs the ERC metrics (``erc_clip_fraction`` is then 0).

    Raises:
        ValueError: if ``args`` is not an :class:`ERCGRPOConfig`, or (after ``GRPOTrainer``'s own
            argument checks) :meth:`ERCGRPOConfig.check_erc_compatible` refuses a setting.
        RuntimeError: if the TRL version is outside :data:`TESTED_TRL`; at the first generation,
            if TRL's old-log-prob pass did not run although ERC is on; with
            ``erc_entropy="exact"``, if the LM head is still sharded or empty in the forward pass
            (the message names the engine).
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: ERCGRPOConfig | None = None,
        *rest: Any,
        **kwargs: Any,
    ) -> None:
        check_trl_version()
        if args is None:  # as GRPOTrainer does, with ERC off
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = ERCGRPOConfig(f"{name.split('/')[-1]}-GRPO")
        if not isinstance(args, ERCGRPOConfig):
            raise ValueError(
                f"ERCGRPOTrainer needs args=ERCGRPOConfig(...), got {type(args).__name__}"
            )
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        args.check_erc_compatible()  # after TRL's own checks: TRL reports its settings first
        self._erc_args = args
        self._erc: ERCConfig | None = args.erc_band
        self._erc_gppo = args.erc_clip == "gppo"
        self._erc_exact = args.erc_entropy == "exact"
        self._erc_random = args.erc_random_matched
        self._erc_scoring = False
        self._erc_old: tuple[Tensor, Tensor] | None = None
        self._erc_batch: dict[str, Any] | None = None
        self._erc_keep = 0
        self._erc_chunks: list[Tensor] | None = None
        if self._erc_exact:
            self._erc_install_hook()

    # -- exact entropy ------------------------------------------------------------------------

    def _erc_causal_lm(self) -> Any:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _erc_install_hook(self) -> None:
        lm = self._erc_causal_lm()
        self._erc_logit_scale, self._erc_softcap = _head_transform(lm.config.get_text_config())
        lm.base_model.register_forward_hook(self._erc_hidden_hook, with_kwargs=True)

    def _erc_hidden_hook(
        self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if self._erc_chunks is None:
            return
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        keep = self._erc_keep
        states = hidden[:, -keep - 1 : -1].detach()
        attention = kwargs.get("attention_mask")
        valid = (
            torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
            if attention is None
            else attention[:, -keep:].bool().to(states.device)
        )
        entropy = torch.zeros(states.shape[:2], dtype=torch.float32, device=states.device)
        with self._erc_head(states.shape[-1]) as (weight, bias):
            entropy[valid] = _exact_entropy(
                states[valid].to(weight.device),
                weight,
                bias,
                temperature=self.temperature,
                logit_scale=self._erc_logit_scale,
                softcap=self._erc_softcap,
            ).to(states.device)
        self._erc_chunks.append(entropy)

    @contextmanager
    def _erc_head(self, hidden_size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
        """The full LM head ``(weight, bias)`` inside the backbone's forward pass.

        Plain and DDP models hold it whole. FSDP2 keeps parameters outside the running unit as
        ``DTensor`` shards: ``full_tensor()`` all-gathers them (every rank runs the same forward,
        so the collective is matched). DeepSpeed ZeRO-3 leaves a parameter partitioned (numel 0)
        unless its own module runs, and the fused head never calls the head module: TRL's
        ``maybe_gather_lm_head_ctx`` (``deepspeed.zero.GatheredParameters``, a no-op without
        ZeRO-3) gathers it for the duration, as TRL does for its own projection. FSDP (v1) holds
        the head whole during the forward when it is in the root unit (the transformer auto-wrap
        policy's layout); a head sharded in its own unit is refused by the shape check.

        Raises:
            RuntimeError: the weight is not ``(vocab, hidden_size)`` (empty or a shard), naming
                the sharding engine.
        """
        head = self._erc_causal_lm().get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        if isinstance(bias, DTensor):
            bias = bias.full_tensor()
        with maybe_gather_lm_head_ctx(weight, bias):
            _check_head(
                weight,
                bias,
                vocab=getattr(head, "out_features", None),
                hidden_size=hidden_size,
                engine=_sharding_engine(self.accelerator, head.weight),
            )
            yield weight, bias

    # -- the two passes -----------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(
        self,
        model: Any,
        input_ids: Tensor,
        attention_mask: Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        old_pass = (
            self._erc_scoring
            and self._erc_old is None
            and model is self.model
            and not torch.is_grad_enabled()
        )
        train_pass = self._erc_batch is not None
        if not (old_pass or train_pass):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                **kwargs,
            )
        if self._erc_exact:
            self._erc_chunks, self._erc_keep = [], logits_to_keep
        try:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy or not self._erc_exact,
                **kwargs,
            )
            chunks = self._erc_chunks
        finally:
            self._erc_chunks = None
        if self._erc_exact:
            if not chunks:
                raise RuntimeError(
                    "erc_entropy='exact' saw no backbone output in this forward pass (is the "
                    "model wrapped in a way that bypasses `base_model`?); use erc_entropy='trl'"
                )
            h = torch.cat(chunks)
        else:
            assert entropies is not None
            h = entropies.detach()
        if old_pass:
            self._erc_old = (logps, h)
            return logps, entropies if compute_entropy else None, aux
        return self._erc_train_logps(logps, h), entropies, aux

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        self._erc_scoring, self._erc_old = True, None
        try:
            output: dict[str, Any] = super()._generate_and_score_completions(inputs)
        finally:
            self._erc_scoring = False
        captured, self._erc_old = self._erc_old, None
        old_logps = output.get("old_per_token_logps")
        if old_logps is None:
            if self._erc is not None:
                raise RuntimeError(
                    "ERC is on but TRL did not run its old-log-prob pass, so there is no old "
                    "entropy: set num_iterations >= 2 or steps_per_generation > "
                    "gradient_accumulation_steps (got gradient_accumulation_steps="
                    f"{self.args.gradient_accumulation_steps}, steps_per_generation="
                    f"{self._erc_args.steps_per_generation}, num_iterations={self.num_iterations})"
                )
            return output
        if captured is None or captured[0] is not old_logps:
            raise RuntimeError(
                "ERCGRPOTrainer did not see TRL's old-log-prob pass, so it has no old entropy; "
                f"this TRL version ({trl.__version__}) computes old_per_token_logps differently "
                f"from the tested trl>={TESTED_TRL[0]},<{TESTED_TRL[1]}"
            )
        output[OLD_ENTROPY_KEY] = captured[1]
        return output

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        # A shallow copy: the GPPO advantages are graph tensors of this step only, while `inputs`
        # is TRL's buffered batch, reused by later iterations.
        self._erc_batch = dict(inputs)
        try:
            loss: Tensor = super()._compute_loss(model, self._erc_batch)
        finally:
            self._erc_batch = None
        return loss

    def _erc_train_logps(self, logps: Tensor, entropy: Tensor) -> Tensor:
        """Apply ERC (and GPPO) to the training pass's log-probs and log the ERC metrics."""
        batch = self._erc_batch
        assert batch is not None
        mask = batch["completion_mask"]
        if "tool_mask" in batch:
            mask = mask * batch["tool_mask"]
        valid = mask.bool()
        old_entropy = batch.get(OLD_ENTROPY_KEY)
        # On-policy (no old pass, ERC necessarily off): the old policy is the current one.
        h_old = entropy if old_entropy is None else old_entropy
        rho = entropy_ratio(entropy, h_old)
        self._erc_log_metrics(rho, h_old, valid)
        if self._erc is not None:
            keep = erc_keep_mask(rho, valid, self._erc)
            if self._erc_random:  # the matched control: as many tokens as ERC, drawn at random
                keep = ~random_mask(valid, (valid & ~keep).sum(), valid.shape, None)
            logps = torch.where(keep, logps, logps.detach())
        old_logps = batch.get("old_per_token_logps")
        if self._erc_gppo and old_logps is not None:
            batch["advantages"] = self._gppo_advantages(logps, old_logps, batch["advantages"])
        return logps

    def _gppo_advantages(self, logps: Tensor, old_logps: Tensor, advantages: Tensor) -> Tensor:
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        adv = adv.detach().expand_as(logps)
        eps_low, eps_high = float(self.epsilon_low), float(self.epsilon_high)
        delta = self._erc_args.delta
        with torch.enable_grad():
            log_ratio = (logps.detach() - old_logps).requires_grad_()
            ratio = torch.exp(log_ratio)
            gppo, ppo = (
                clipped_objective(
                    ratio, adv, clip=clip, eps_low=eps_low, eps_high=eps_high, dual_clip_c=delta
                )
                for clip in ("gppo", "ppo")
            )
            (extra,) = torch.autograd.grad((gppo - ppo).sum(), log_ratio)
        ppo_value = ppo.detach()
        nonzero = ppo_value != 0
        factor = torch.where(nonzero, adv * extra / torch.where(nonzero, ppo_value, 1.0), 0.0)
        return _GPPOAdvantage.apply(adv, logps, factor)

    # -- metrics ------------------------------------------------------------------------------

    def _erc_metric_sums(self, rho: Tensor, h_old: Tensor, valid: Tensor) -> Tensor:
        """Local sums behind the ERC metrics (summed over processes by the caller)."""
        v = valid.float()
        if self._erc is not None:
            below = ((rho <= self._erc.low) & valid).float()
            above = ((rho >= self._erc.high) & valid).float()
        else:
            below = above = torch.zeros_like(v)
        clipped = below + above
        kept = v - clipped
        h = h_old.float()
        return torch.stack(
            [
                v.sum(),
                below.sum(),
                above.sum(),
                _masked_sum(h, v),
                _masked_sum(rho, v),
                _masked_sum(h, clipped),
                clipped.sum(),
                _masked_sum(h, kept),
                kept.sum(),
            ]
        )

    def _erc_log_metrics(self, rho: Tensor, h_old: Tensor, valid: Tensor) -> None:
        mode = "train" if self.accelerator.unwrap_model(self.model).training else "eval"
        with torch.no_grad():
            sums = self._erc_metric_sums(rho, h_old, valid)
            total = self.accelerator.reduce(sums, reduction="sum").tolist()
            inf = torch.tensor([math.inf], device=rho.device)
            local_min = torch.where(valid, rho, inf).min().reshape(1)
            local_max = torch.where(valid, rho, -inf).max().reshape(1)
            lo = float(self.accelerator.gather(local_min).min())
            hi = float(self.accelerator.gather(local_max).max())
        n, below, above, h_sum, rho_sum, h_clip, n_clip, h_kept, n_kept = total

        def ratio(num: float, den: float) -> float:
            return num / den if den > 0 else math.nan

        values = {
            "erc_clip_fraction": ratio(below + above, n) if n > 0 else 0.0,
            "erc_clip_fraction_low": ratio(below, n) if n > 0 else 0.0,
            "erc_clip_fraction_high": ratio(above, n) if n > 0 else 0.0,
            "entropy_old": ratio(h_sum, n),
            "entropy_ratio_mean": ratio(rho_sum, n),
            "entropy_ratio_min": lo if math.isfinite(lo) else math.nan,
            "entropy_ratio_max": hi if math.isfinite(hi) else math.nan,
            "erc_clipped_entropy_old_mean": ratio(h_clip, n_clip),
            "erc_kept_entropy_old_mean": ratio(h_kept, n_kept),
        }
        if self._erc_random:  # the control stops as many tokens as the band would have clipped
            values["random_mask_fraction"] = values["erc_clip_fraction"]
        for key, value in values.items():
            self._metrics[mode][key].append(value)
