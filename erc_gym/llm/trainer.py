"""GRPO / DAPO / GPPO (+ERC) for transformers causal LMs: one process, one device.

One training step (docs/method.md section 3): sample ``prompts_per_step`` prompts x ``group_size``
responses -> rewards from the shared verifier -> DAPO group filter (optionally generating more
batches) -> one no-grad scoring pass that gives both ``old_log_prob`` and ``old_entropy`` ->
GRPO advantages -> ``epochs`` passes over mini-batches of ``mini_batch_prompts`` groups, one
optimiser step each, the loss being :func:`erc_gym.losses.policy_loss`. The first mini-batch is
on-policy; ERC acts on the later ones.

Users who outgrow one device move to TRL or verl with the ERC adapters, not to this trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erc_gym.adaptive_band import (
    AdaptiveERCBand,
    check_target_clip_fraction,
    off_policy_clip_fraction,
)
from erc_gym.advantages import filter_groups, group_advantages, overlong_penalty
from erc_gym.atomic import atomic_open, atomic_write, merge_json
from erc_gym.diagnostics import (
    CLIPPING_FILE,
    audit_seed,
    clip_audit,
    ratio_histogram,
    state_audit,
)
from erc_gym.entropy import linear_kl_divergence
from erc_gym.envs.rewards import numeric_match
from erc_gym.envs.tasks import Problem, check_arithmetic, load_jsonl, make_arithmetic_problems
from erc_gym.envs.vocab_bandit import MAX_VOCAB
from erc_gym.jsonl import append_jsonl, read_jsonl, truncate_metrics
from erc_gym.limits import MAX_SEED
from erc_gym.llm.model import TINY_PRESETS, load_model_and_tokenizer, make_tiny_lm
from erc_gym.llm.rollout import (
    RolloutBatch,
    check_fused_head,
    generate,
    head_parameters,
    response_logits,
    response_logprobs,
)
from erc_gym.losses import LossConfig, LossStats, loss_metrics, policy_loss
from erc_gym.methods import MethodRuntime, MethodSettings, method_defaults

__all__ = [
    "CHECKPOINTS",
    "METRIC_KEYS",
    "RESUMABLE_CHANGES",
    "Checkpoint",
    "ERCTrainer",
    "TrainerConfig",
    "check_resume",
    "config_changes",
    "find_checkpoint",
    "split_held_out",
]

#: A run folder's checkpoints, newest first: each save renames the last one to the second name,
#: so a damaged newest checkpoint leaves the one before it to resume from.
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt")

#: Keys written to every line of ``metrics.jsonl`` (loss keys: see docs/metrics.md).
METRIC_KEYS = (
    "step",
    "reward",
    "accuracy",
    "response_length",
    "entropy",
    "entropy_old",
    "entropy_ratio_q05",
    "entropy_ratio_q50",
    "entropy_ratio_q95",
    "entropy_ratio_hist",
    "erc_clip_fraction",
    "erc_clip_fraction_off_policy",
    "erc_low",
    "erc_high",
    "clip_fraction",
    "grad_norm",
    "lr",
    "tokens_per_second",
    "time_generate",
    "time_score",
    "time_train",
    "batch_fill",
    "gen_batches",
    "nan_rewards",
    "skipped_steps",
    "update_steps",
)


@dataclass
class TrainerConfig(MethodSettings):
    """Everything a run needs; saved as ``config.json`` next to ``metrics.jsonl``.

    The rival methods, baselines and controls (:class:`~erc_gym.methods.MethodSettings`) are
    settings (and ``erc-gym llm`` flags) too, all off by default; a KL penalty is the exact
    per-token KL(pi_old || pi) over the vocabulary and needs ``fused_head``.
    """

    model: str = "tiny"
    """A built-in preset (``tiny``, ``small``, ``base100m`` (~0.1B, for a GPU): random init + SFT
    warm start) or a local Hugging Face model directory (its tokenizer is loaded from the same
    directory)."""
    vocab_size: int | None = None
    """Presets only: pad the character tokenizer (and the model) to this many tokens, e.g. 32000,
    so entropies and memory behave like an LLM's. ``None``: the bare alphabet (18 tokens)."""
    dataset: str = "arithmetic"
    """``arithmetic`` (generated) or a JSONL file of ``{"prompt", "answer"}`` rows."""
    eval_dataset: str | None = None
    """JSONL file for held-out evaluation. ``None``: a held-out set disjoint from training, of
    num_eval distinct prompts (at most a quarter of them): generated for ``arithmetic``, and for
    a dataset file split off it by a seeded shuffle and removed from the training rows."""
    digits: int = 1
    """Arithmetic: maximum digits per operand."""
    ops: str = "+"
    """Arithmetic: operators."""
    num_train: int = 2000
    """Arithmetic: training problems."""
    num_eval: int = 100
    """Held-out problems (generated, or split off a dataset file without eval_dataset)."""
    loss: str = "dapo"
    """``ppo``, ``dapo`` (clip-higher 0.2/0.28, dual-clip 10) or ``gppo``."""
    erc_low: float | None = None
    """ERC band lower bound (``None`` with ``erc_high=None``: ERC off). The paper: 0.95."""
    erc_high: float | None = None
    """ERC band upper bound. The paper: 1.05."""
    erc_target_clip_fraction: float | None = None
    """This project's adaptive band (not the paper's; erc_gym.adaptive_band): after each step,
    widen or narrow the band so that ERC clips about this share of the tokens of the step's
    off-policy mini-batches, starting from erc_low/erc_high. None: the fixed band (the paper's)."""
    group_size: int = 8
    """Responses per prompt (G); group advantages need at least 2."""
    prompts_per_step: int = 16
    """Prompts (groups) per training batch."""
    mini_batch_prompts: int = 4
    """Prompts per optimiser step: the batch gives prompts_per_step / mini_batch_prompts
    off-policy steps per epoch (the reference scripts: 128 / 16 = 8)."""
    epochs: int = 1
    """Passes over each batch."""
    lr: float = 1e-4
    """AdamW learning rate (constant after warm-up). Tiny models need far more than the 1e-6 used
    for 1.5B models."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up, in optimiser steps."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; a step whose norm is not finite is skipped and counted."""
    filter_groups: bool = True
    """DAPO dynamic sampling: drop groups whose rewards are all equal."""
    max_gen_batches: int = 3
    """Generation rounds per step to fill the batch with informative groups; the step trains on
    what it has after that (its fill is logged as batch_fill)."""
    overlong_buffer: int = 0
    """DAPO overlong shaping buffer L_c in tokens (0: off)."""
    overlong_penalty_factor: float = 1.0
    """Scale of the overlong penalty."""
    positive_nll_coef: float = 0.0
    """Weight of an NLL term on correct responses (the reference scripts use 0.1); not masked by
    ERC."""
    temperature: float = 1.0
    """Sampling temperature; log-probs and entropies are of logits / temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_new_tokens: int = 8
    """Response token limit."""
    steps: int = 30
    """Training steps (batches)."""
    eval_every: int = 10
    """Evaluate on the held-out set every this many steps (and at the start and end)."""
    eval_greedy: bool = True
    """Evaluate with greedy decoding (else sample at ``temperature``)."""
    score_evals: int = 1
    """The run's score (``eval_score``, logged at every evaluation) is the mean held-out accuracy
    of its last this-many evaluations: one evaluation of a few hundred problems moves by a few
    points between neighbouring steps, a mean of 3 less. 1: the last evaluation alone."""
    eval_pass_k: int = 0
    """Also sample this many responses per held-out problem at each evaluation (at
    ``temperature``, from a generator of its own, so training is unchanged) and log
    ``eval_pass_at_k`` (share of problems with a correct one among them) and
    ``eval_sampled_accuracy`` (share of correct samples, pass@1). Costs ``eval_pass_k x
    num_eval`` sampled responses per evaluation. 0: off."""
    sft_steps: int = 300
    """Presets only: supervised warm-start steps before RL (0: start from random init)."""
    sft_lr: float = 3e-3
    """Presets only: warm-start learning rate."""
    warm_start_cache: str | None = None
    """Presets only: a folder that keeps SFT warm starts, one file per everything a warm start
    depends on (preset, vocabulary, data, SFT steps and lr, seed, device, dtype), so runs that
    differ only after it (RL settings, methods) train it once; the weights are those the run
    would have trained. None: no cache."""
    seed: int = 0
    """Seed of the model init, the data order and sampling."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu`` or ``cuda``."""
    dtype: str = "auto"
    """``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16`` (CUDA only:
    without loss scaling fp16 weights overflow to NaN on the CPU)."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory (large models)."""
    score_micro_batch: int = 64
    """Sequences per no-grad scoring forward."""
    fused_head: bool = True
    """Compute log-probs and entropies from the last hidden states and the LM-head weight chunk by
    chunk (same values; no (tokens x vocabulary) logits in memory, which dominate for large
    vocabularies). Off: the model's own logits are computed first."""
    save_every: int = 10
    """Checkpoint every this many steps (0: no step-based checkpoints); always at the end. The
    same command resumes from the last checkpoint."""
    save_minutes: float = 10.0
    """Also checkpoint when this many minutes passed since the last one (0: off)."""
    run_dir: str = "runs"
    """Parent folder of runs."""
    name: str = "llm"
    """Run name: the run lives in ``run_dir/name``."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to the run folder."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def loss_config(self) -> LossConfig:
        """The :class:`~erc_gym.losses.LossConfig` of this run."""
        # the KL penalty is exact, from both policies' hidden states
        base = LossConfig.named(self.loss, self.erc_low, self.erc_high)
        return self.apply_to(base, kl_estimator="exact")

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent settings."""
        self.loss_config()  # checks the methods too
        if self.needs_kl and not self.fused_head:
            raise ValueError(
                f"kl_coef={self.kl_coef} needs fused_head=True: the exact KL to the old policy "
                "is computed from the hidden states of both policies and their LM heads"
            )
        check_target_clip_fraction(self.erc_target_clip_fraction, self.erc_low, self.erc_high)
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 for group advantages, got group_size={self.group_size}"
            )
        for name, low in _MIN_VALUES.items():
            value = getattr(self, name)
            if value is not None and not low <= value < math.inf:
                what = "a finite number " if isinstance(value, float) else ""
                raise ValueError(f"{name} must be {what}>= {low}, got {name}={value}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**32 - 1], got seed={self.seed}")
        for name in ("num_train", "num_eval"):
            if getattr(self, name) > MAX_PROBLEMS:
                raise ValueError(
                    f"{name} must be <= {MAX_PROBLEMS} (problems are made or split up front), "
                    f"got {name}={getattr(self, name)}"
                )
        if self.vocab_size is not None and self.vocab_size > MAX_VOCAB:
            raise ValueError(
                f"vocab_size must be <= {MAX_VOCAB} (Qwen2's vocabulary, the largest this "
                f"project pads to), got vocab_size={self.vocab_size}"
            )
        if self.dataset == "arithmetic":
            check_arithmetic(self.digits, self.ops)
        for name in ("lr", "max_grad_norm", "temperature", "sft_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(
                    f"{name} must be a finite number > 0, got {name}={getattr(self, name)}"
                )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got top_p={self.top_p}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got dtype={self.dtype!r}"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got device={self.device!r}")
        for name in ("dataset", "eval_dataset"):
            value = getattr(self, name)
            if value not in (None, "arithmetic") and not Path(value).is_file():
                raise ValueError(f"{name}={value!r}: no such file (a JSONL file of prompt/answer)")
        if self.model not in TINY_PRESETS and not Path(self.model).is_dir():
            raise ValueError(
                f"model={self.model!r} is neither a built-in preset ({', '.join(TINY_PRESETS)}) "
                "nor a local folder (models are never downloaded; save one with save_pretrained)"
            )
        if self.name in (".", "..") or not self.name or Path(self.name).name != self.name:
            raise ValueError(f"name must be a plain folder name, got name={self.name!r}")
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} must be a multiple of "
                f"mini_batch_prompts={self.mini_batch_prompts}"
            )


#: Most training or held-out problems (a typo of 10**9 would hang in making them).
MAX_PROBLEMS = 1_000_000

#: Lower bounds of the numeric settings (``validate`` names the setting and the value).
_MIN_VALUES: dict[str, float] = {
    "vocab_size": 1,
    "digits": 1,
    "num_train": 1,
    "num_eval": 1,
    "prompts_per_step": 1,
    "mini_batch_prompts": 1,
    "epochs": 1,
    "weight_decay": 0,
    "warmup_steps": 0,
    "max_gen_batches": 1,
    "overlong_buffer": 0,
    "max_new_tokens": 1,
    "steps": 1,
    "eval_every": 1,
    "sft_steps": 0,
    "score_micro_batch": 1,
    "score_evals": 1,
    "eval_pass_k": 0,
    "save_every": 0,
    "save_minutes": 0,
    "overlong_penalty_factor": 0,
    "positive_nll_coef": 0,
}

#: Sequences per step whose full distributions before and after the update are compared for
#: ``clipping.jsonl`` (:func:`~erc_gym.diagnostics.state_audit`): two small no-grad forwards.
AUDIT_ROWS = 8
#: ... and their first this many response tokens: the audit holds two ``(rows x tokens, V)`` fp32
#: logit tensors, about 0.3 GB each at 8 x 64 tokens and a 150k vocabulary.
AUDIT_TOKENS = 64

#: Bumped when the SFT warm start's computation changes (the cache's files name it).
WARM_START_VERSION = 1

#: Settings that may change when a run resumes: how long it runs and how it logs and saves.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "progress",
        "tensorboard",
        "save_every",
        "save_minutes",
        "run_dir",
        "name",
        "warm_start_cache",
    }
)

#: Named settings for ``erc-gym llm --preset NAME`` (a tiny model on the arithmetic task).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-arith-dapo": {"loss": "dapo"},
    "tiny-arith-dapo-erc": {"loss": "dapo", "erc_low": 0.95, "erc_high": 1.05},
    "tiny-arith-gppo": {"loss": "gppo"},
    "tiny-arith-gppo-erc": {"loss": "gppo", "erc_low": 0.95, "erc_high": 1.05},
}


def split_held_out(
    rows: list[Problem], num_eval: int, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """Split a dataset into training rows and held-out problems that share no prompt.

    ``min(num_eval, distinct prompts // 4)`` distinct prompts are drawn by a shuffle seeded with
    ``seed`` (the same split every run); every row with one of them leaves the training set.

    Raises:
        ValueError: if the rows have fewer than 4 distinct prompts.
    """
    distinct = list({p["prompt"]: p for p in rows}.values())
    n_eval = min(num_eval, len(distinct) // 4)
    if n_eval < 1:
        raise ValueError(
            f"the dataset has {len(distinct)} distinct prompts, too few to hold out a quarter "
            "for evaluation; pass eval_dataset (--eval-dataset FILE)"
        )
    order = np.random.default_rng(seed).permutation(len(distinct))
    held_out = [distinct[i] for i in order[:n_eval]]
    excluded = {p["prompt"] for p in held_out}
    return [p for p in rows if p["prompt"] not in excluded], held_out


@dataclass
class _StepLog:
    stats: list[LossStats] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0
    update_steps: int = 0


#: Settings added after run folders were first written, with the default that reproduces those
#: runs (an older ``config.json`` without them still resumes).
_ADDED_SETTINGS: dict[str, Any] = {
    "erc_target_clip_fraction": None,
    "score_evals": 1,
    "eval_pass_k": 0,
    **method_defaults(),
}


def config_changes(config: TrainerConfig) -> dict[str, tuple[Any, Any]]:
    """Settings that differ from the run folder's ``config.json``: ``{key: (saved, now)}``.

    Keys in :data:`RESUMABLE_CHANGES` (``steps``, logging, checkpoint cadence) may differ on
    resume and are not reported. Empty if the folder has no ``config.json``.
    """
    path = Path(config.run_dir) / config.name / "config.json"
    if not path.exists():
        return {}
    now = dataclasses.asdict(config)
    # keys that are not settings (an experiment runner's record of the run) are not compared;
    # a setting added after the folder was written is recorded there as its default
    recorded = {k: v for k, v in json.loads(path.read_text()).items() if k in now}
    saved = {**_ADDED_SETTINGS, **recorded}
    missing = "(absent)"
    return {
        k: (saved.get(k, missing), now.get(k, missing))
        for k in sorted(set(saved) | set(now))
        if k not in RESUMABLE_CHANGES and saved.get(k, missing) != now.get(k, missing)
    }


@dataclass
class Checkpoint:
    """The checkpoint a run resumes from (see :func:`find_checkpoint`)."""

    path: Path
    """The file."""
    step: int
    """Training steps it holds."""
    damaged: list[str] = field(default_factory=list)
    """Newer checkpoints that could not be read, each as ``"<path> (<why>)"``."""


def find_checkpoint(run_path: str | Path) -> Checkpoint | None:
    """The newest readable checkpoint of a run folder (:data:`CHECKPOINTS`), or None if it has
    none. Only the step is read (the tensors are memory-mapped, not loaded).

    Raises:
        ValueError: the folder has checkpoints and none can be read (a truncated file): the
            message names them and says what to do.
    """
    damaged: list[str] = []
    for name in CHECKPOINTS:
        path = Path(run_path) / name
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            return Checkpoint(path, int(state["step"]), damaged)
        except Exception as err:
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            damaged.append(f"{path} ({type(err).__name__}: {why})")
    if damaged:
        raise ValueError(
            f"damaged checkpoint: {' and '.join(damaged)} cannot be read (a truncated or "
            "overwritten file) and no earlier checkpoint is intact; put a good copy back, or "
            "start over with --restart (train(resume=False)), which deletes the run's "
            "checkpoints and metrics"
        )
    return None


def check_resume(config: TrainerConfig) -> Checkpoint | None:
    """Refuse to continue a run whose recorded settings differ from ``config`` or whose
    checkpoints are all damaged; return the checkpoint the run resumes from (None: step 0).

    A run folder with a checkpoint or metrics and a ``config.json`` whose settings differ (other
    than :data:`RESUMABLE_CHANGES`) would mix two runs under one name. Cheap (no model is built,
    no checkpoint tensor read): the command line calls it before the warm start.

    Raises:
        ValueError: naming every differing setting, old and new value; or naming the damaged
            checkpoints (see :func:`find_checkpoint`).
    """
    run_path = Path(config.run_dir) / config.name
    has_run = any((run_path / name).exists() for name in (*CHECKPOINTS, "metrics.jsonl"))
    changes = config_changes(config) if has_run else {}
    if changes:
        diff = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise ValueError(
            f"run folder {run_path} holds a run with other settings ({diff}); start over with "
            "--restart (train(resume=False)), which deletes its checkpoint and metrics, or "
            "choose another --name"
        )
    return find_checkpoint(run_path)


class ERCTrainer:
    """GRPO-family trainer with ERC for a transformers causal LM (see module docstring).

    Args:
        config: the run's :class:`TrainerConfig`.
        verifier: ``(completion, answer) -> float``; default
            :func:`~erc_gym.envs.rewards.numeric_match`.

    Example:
        >>> trainer = ERCTrainer(TrainerConfig(steps=2, sft_steps=50, progress=False))
        >>> history = trainer.train()        # doctest: +SKIP
    """

    def __init__(self, config: TrainerConfig, verifier: Any = numeric_match) -> None:
        config.validate()
        self.config = config
        self.verifier = verifier
        self.loss_config = config.loss_config()
        #: The adaptive band's controller (None: the fixed band or ERC off).
        self.erc_band_control: AdaptiveERCBand | None = None
        if config.erc_target_clip_fraction is not None and self.loss_config.erc is not None:
            self.erc_band_control = AdaptiveERCBand(
                config.erc_target_clip_fraction,
                low=self.loss_config.erc.low,
                high=self.loss_config.erc.high,
            )
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu")
            if config.device == "auto"
            else config.device
        )
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={config.device!r}, but this torch has no CUDA device "
                f"(torch {torch.__version__}); use device='cpu' or 'auto'"
            )
        if config.dtype == "float16" and self.device.type == "cpu":
            raise ValueError(
                "dtype='float16' needs a CUDA device: on the CPU the fp16 weights overflow to NaN "
                "in training (no loss scaling); use dtype='float32' or 'bfloat16'"
            )
        if config.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, config.dtype)
        self.run_path = Path(config.run_dir) / config.name
        self.train_problems, self.eval_problems = self._load_data()
        self.model, self.tokenizer = self._load_model()
        context = getattr(self.model.config, "max_position_embeddings", None)
        self.max_prompt_tokens = None if context is None else context - config.max_new_tokens
        self._check_context()  # before the warm start: a bad setting fails in seconds
        self._warm = not (config.model in TINY_PRESETS and config.sft_steps > 0)
        # A run folder with checkpoints resumes from one (the warm start would be overwritten),
        # or is refused, or starts over: train() decides, and warm-starts only from step 0.
        if not any((self.run_path / name).exists() for name in CHECKPOINTS):
            self._warm_start()
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        warmup = max(config.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.data_gen = torch.Generator().manual_seed(config.seed)
        #: The rival methods' run-time state (adaptive coefficients, random draws, early stop).
        self.methods = MethodRuntime(config, config.seed, device=self.device)
        #: The old policy's response hidden states and LM head (exact KL penalty only).
        self._old_policy: tuple[torch.Tensor, dict[str, Any]] | None = None
        self.step = 0
        self.skipped_steps = 0
        self.nan_rewards = 0
        self._tb: Any = None
        self._fused_head_checked = False
        #: The step of the last checkpoint written or restored (None: none yet).
        self.saved_step: int | None = None
        #: Held-out accuracy of every evaluation so far (the score averages the last few).
        self._eval_history: list[float] = []
        #: The last step's line of ``clipping.jsonl`` (None: nothing to record).
        self._audit: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up

    def _load_data(self) -> tuple[list[Problem], list[Problem]]:
        c = self.config
        if c.dataset == "arithmetic":
            # Held-out problems are distinct prompts that the training set never contains; in a
            # small problem space at most a quarter of the distinct prompts are held out.
            pool = make_arithmetic_problems(
                4 * (c.num_train + c.num_eval), digits=c.digits, ops=c.ops, seed=c.seed + 10_000
            )
            distinct = list({p["prompt"]: p for p in pool}.values())
            held_out = distinct[: min(c.num_eval, max(1, len(distinct) // 4))]
            excluded = {p["prompt"] for p in held_out}
            train = [
                p
                for p in make_arithmetic_problems(
                    2 * c.num_train, digits=c.digits, ops=c.ops, seed=c.seed
                )
                if p["prompt"] not in excluded
            ][: c.num_train]
        elif c.eval_dataset:
            train, held_out = load_jsonl(c.dataset), []
        else:
            # Never evaluate on training rows: hold out a seeded share of the file's prompts.
            train, held_out = split_held_out(load_jsonl(c.dataset), c.num_eval, c.seed)
        if c.eval_dataset:
            held_out = load_jsonl(c.eval_dataset)
        return train, held_out

    def _load_model(self) -> tuple[Any, Any]:
        c = self.config
        if c.model in TINY_PRESETS:
            from erc_gym.envs.token_env import TokenArithmetic
            from erc_gym.envs.tokenizer import CharTokenizer

            alphabet = sorted(
                set(TokenArithmetic.ALPHABET).union(
                    *(set(p["prompt"] + p["answer"]) for p in self.train_problems)
                )
            )
            tokenizer = CharTokenizer.build(alphabet, vocab_size=c.vocab_size)
            model = make_tiny_lm(len(tokenizer), c.model, seed=c.seed)
            model.to(self.device, self.dtype)
            return model, tokenizer
        model, tokenizer = load_model_and_tokenizer(c.model, dtype=self.dtype)
        return model.to(self.device), tokenizer

    def _warm_start_key(self) -> str:
        """A file name for everything the SFT warm start depends on (``warm_start_cache``)."""
        c = self.config
        fields = (
            *("model", "vocab_size", "dataset", "eval_dataset", "digits", "ops"),
            *("num_train", "num_eval", "sft_steps", "sft_lr", "seed"),
        )
        parts = {name: getattr(c, name) for name in fields}
        parts |= {
            "version": WARM_START_VERSION,
            "device": self.device.type,
            "dtype": str(self.dtype),
            "tokens": len(self.tokenizer),
            "train": hashlib.sha256(json.dumps(self.train_problems).encode()).hexdigest(),
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
        return f"{c.model}-sft{c.sft_steps}-seed{c.seed}-{digest.hexdigest()[:16]}"

    def _warm_start(self) -> None:
        """The presets' supervised warm start, once per trainer: ``__init__`` makes it unless
        the run folder has a checkpoint, ``train`` then only when it starts from step 0."""
        if not self._warm:
            self._sft_or_cached()
            self._warm = True

    def _sft_or_cached(self) -> None:
        """Supervised warm start (:func:`~erc_gym.llm.model.sft_warmstart`), from the cache when
        one is set and holds it."""
        from erc_gym.llm.model import sft_warmstart

        c = self.config

        def train() -> None:
            sft_warmstart(
                self.model,
                self.tokenizer,
                self.train_problems,
                steps=c.sft_steps,
                lr=c.sft_lr,
                seed=c.seed,
                progress=c.progress,
            )

        if c.warm_start_cache is None:
            train()
            return
        from filelock import FileLock

        folder = Path(c.warm_start_cache)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self._warm_start_key()}.pt"
        # one process trains a given warm start; another one waiting for it then loads it
        with FileLock(str(path) + ".lock"):
            if path.exists():
                try:
                    state = torch.load(path, map_location=self.device, weights_only=True)
                    self.model.load_state_dict(state)
                    self.model.eval()
                    return
                except (OSError, RuntimeError, ValueError, EOFError):
                    path.unlink(missing_ok=True)  # damaged: trained again below
            train()
            atomic_write(path, lambda tmp: torch.save(self.model.state_dict(), tmp))

    def _check_context(self) -> None:
        """Fail now, not mid-run, if the longest prompt plus ``max_new_tokens`` exceeds the
        model's context (``max_position_embeddings``)."""
        if self.max_prompt_tokens is None:
            return
        prompts = {p["prompt"] for p in self.train_problems + self.eval_problems}
        longest = max(
            (len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts),
            default=0,
        )
        context = self.max_prompt_tokens + self.config.max_new_tokens
        if longest >= context:
            raise ValueError(
                f"the longest prompt has {longest} tokens, more than the context allows for "
                f"prompts: the model has {context} positions (max_position_embeddings) and "
                "needs room for at least one new token; shorten the prompts or use a model "
                "with a longer context"
            )
        if longest > self.max_prompt_tokens:
            raise ValueError(
                f"max_new_tokens={self.config.max_new_tokens} leaves "
                f"{max(self.max_prompt_tokens, 0)} of the model's {context} positions "
                f"(max_position_embeddings) for prompts, and the longest prompt has {longest} "
                f"tokens; lower max_new_tokens to at most {context - longest}"
            )

    # ------------------------------------------------------------------ one step

    def _sample_problems(self, n: int) -> list[Problem]:
        idx = torch.randint(len(self.train_problems), (n,), generator=self.data_gen).tolist()
        return [self.train_problems[i] for i in idx]

    def _generate_batch(self) -> tuple[RolloutBatch, dict[str, float]]:
        c = self.config
        g = c.group_size
        kept: list[RolloutBatch] = []
        all_rewards: list[torch.Tensor] = []
        n_kept, rounds = 0, 0
        while n_kept < c.prompts_per_step and rounds < max(1, c.max_gen_batches):
            rounds += 1
            batch = generate(
                self.model,
                self.tokenizer,
                self._sample_problems(c.prompts_per_step),
                g,
                self.verifier,
                max_new_tokens=c.max_new_tokens,
                temperature=c.temperature,
                top_p=c.top_p,
                max_prompt_tokens=self.max_prompt_tokens,
            )
            nan = torch.isnan(batch.rewards)
            self.nan_rewards += int(nan.sum())
            all_rewards.append(batch.rewards[~nan])
            keep_groups = ~nan.reshape(-1, g).all(1)
            if c.filter_groups:
                informative = filter_groups(batch.rewards, g).reshape(-1, g)[:, 0]
                keep_groups &= informative
            if not c.filter_groups:
                rounds = c.max_gen_batches  # one round is the whole batch
            rows = torch.nonzero(keep_groups.repeat_interleave(g)).squeeze(-1)
            if rows.numel():
                kept.append(batch.select(rows))
                n_kept += rows.numel() // g
        generated = torch.cat(all_rewards)
        if not generated.numel():
            name = getattr(self.verifier, "__name__", repr(self.verifier))
            raise ValueError(
                f"verifier {name!r} returned NaN for every one of the {rounds * len(batch)} "
                f"responses of step {self.step + 1} (e.g. prompt {batch.prompts[0]!r}, "
                f"completion {batch.completions[0]!r}, answer {batch.answers[0]!r}); a NaN reward "
                "excludes its response, so the step would train on nothing: return a number "
                "(e.g. 0.0) for a response the verifier cannot check"
            )
        stats = {
            "gen_batches": rounds,
            "reward": float(generated.mean()) if generated.numel() else math.nan,
            "accuracy": float((generated > 0.5).float().mean()) if generated.numel() else math.nan,
        }
        if not kept:
            return batch.select(torch.arange(0)), {"batch_fill": 0.0, **stats}
        full = RolloutBatch.cat(kept, self.tokenizer.pad_token_id)
        full = full.select(torch.arange(min(len(full), c.prompts_per_step * g)))
        return full, {"batch_fill": len(full) / (c.prompts_per_step * g), **stats}

    def _rewards_and_advantages(self, batch: RolloutBatch) -> torch.Tensor:
        c = self.config
        rewards = batch.rewards.clone()
        if c.overlong_buffer > 0:
            lengths = batch.response_mask.sum(1).cpu()
            rewards += overlong_penalty(
                lengths, c.max_new_tokens, c.overlong_buffer, c.overlong_penalty_factor
            )
        # a NaN reward excludes its sample: it gets advantage 0 and no loss tokens
        nan = torch.isnan(rewards)
        groups = rewards.reshape(-1, c.group_size)
        filled = torch.where(torch.isnan(groups), groups.nanmean(1, keepdim=True), groups)
        adv = group_advantages(filled.reshape(-1), c.group_size)
        return torch.where(nan, torch.zeros_like(adv), adv)

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The old policy's log-probs and entropies: one no-grad forward per micro-batch."""
        if self.config.fused_head and not self._fused_head_checked:
            check_fused_head(self.model, batch.select([0]), temperature=self.config.temperature)
            self._fused_head_checked = True
        lps, hs = [], []
        hidden: list[torch.Tensor] | None = [] if self.config.needs_kl else None
        for start in range(0, len(batch), self.config.score_micro_batch):
            part = batch.select(
                torch.arange(start, min(start + self.config.score_micro_batch, len(batch)))
            )
            lp, h = response_logprobs(
                self.model,
                part,
                temperature=self.config.temperature,
                fused_head=self.config.fused_head,
                hidden_out=hidden,
            )
            lps.append(lp)
            hs.append(h)
        if hidden is not None:
            # the old policy for the exact KL: its hidden states and a copy of its head
            head = head_parameters(self.model)
            head["weight"] = head["weight"].detach().clone()
            head["bias"] = None if head["bias"] is None else head["bias"].detach().clone()
            self._old_policy = (torch.cat(hidden), head)
        return torch.cat(lps), torch.cat(hs)

    def _train_on(
        self, batch: RolloutBatch, old_lp: torch.Tensor, old_h: torch.Tensor, adv: torch.Tensor
    ) -> _StepLog:
        c = self.config
        log = _StepLog()
        g = c.group_size
        n_groups = len(batch) // g
        valid = batch.response_mask & ~torch.isnan(batch.rewards)[:, None].to(
            batch.response_mask.device
        )
        correct = (batch.rewards > 0.5).to(valid.device)
        adv = adv.to(self.device)
        self.model.train()
        for _ in range(c.epochs):
            order = torch.randperm(n_groups, generator=self.data_gen)
            for start in range(0, n_groups, c.mini_batch_prompts):
                groups = order[start : start + c.mini_batch_prompts]
                rows = (groups[:, None] * g + torch.arange(g)).reshape(-1)
                mb = batch.select(rows)
                hidden: list[torch.Tensor] | None = [] if c.needs_kl else None
                lp, h = response_logprobs(
                    self.model,
                    mb,
                    temperature=c.temperature,
                    fused_head=c.fused_head,
                    entropy_grad=c.needs_entropy_grad,
                    hidden_out=hidden,
                )
                rows_d = rows.to(self.device)
                out = policy_loss(
                    lp,
                    old_lp[rows_d],
                    adv[rows_d],
                    entropy=h,
                    old_entropy=old_h[rows_d],
                    mask=valid[rows_d],
                    config=self.loss_config,
                    metrics=False,
                    kl=None if hidden is None else self._kl(hidden[0], rows_d),
                    **self.methods.loss_kwargs(),
                )
                log.stats.append(out.stats)
                if self.methods.should_stop(out.stats):  # target_kl: SB3's rule
                    return log
                loss = out.loss
                if c.positive_nll_coef > 0:
                    m = (valid[rows_d] & correct[rows_d, None]).float()
                    loss = loss + c.positive_nll_coef * (-(lp * m).sum() / m.sum().clamp(min=1))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                if not torch.isfinite(norm):
                    log.skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                log.grad_norms.append(float(norm))
                with self.methods.scaled_lr(self.optimizer, out):
                    self.optimizer.step()
                self.scheduler.step()
                log.update_steps += 1
                self.methods.after_step(out)
        return log

    def _kl(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Exact per-token KL(pi_old || pi) of a mini-batch, from both policies' hidden states."""
        assert self._old_policy is not None
        old_hidden, old_head = self._old_policy
        head = head_parameters(self.model)
        return linear_kl_divergence(
            hidden,
            head["weight"],
            old_hidden[rows],
            old_head["weight"],
            bias=head["bias"],
            old_bias=old_head["bias"],
            temperature=self.config.temperature,
            logit_scale=head["logit_scale"],
            softcap=head["softcap"],
        )

    def train_step(self) -> dict[str, Any]:
        """One generate -> score -> update step; returns its metrics line."""
        t0 = time.perf_counter()
        batch, fill = self._generate_batch()
        t1 = time.perf_counter()
        if len(batch) == 0:
            self.step += 1
            return {"step": self.step, **fill, "skipped_steps": self.skipped_steps}
        adv = self._rewards_and_advantages(batch)
        old_lp, old_h = self.score(batch)
        seed = audit_seed(self.config.seed, self.step + 1)
        pick = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed))
        audited = batch.select(pick[:AUDIT_ROWS])
        audited = dataclasses.replace(
            audited,
            response_ids=audited.response_ids[:, :AUDIT_TOKENS],
            response_mask=audited.response_mask[:, :AUDIT_TOKENS],
        )
        old_logits = response_logits(self.model, audited)
        t2 = time.perf_counter()
        if self.erc_band_control is not None:
            self.loss_config = dataclasses.replace(self.loss_config, erc=self.erc_band_control.band)
        log = self._train_on(batch, old_lp, old_h, adv)
        self.methods.after_update(log.stats)
        self._old_policy = None
        self._audit = self._clip_audit(log, audited, old_logits, seed)
        t3 = time.perf_counter()
        self.skipped_steps += log.skipped
        self.step += 1
        line = self._step_metrics(batch, log, fill, (t0, t1, t2, t3))
        if self.erc_band_control is not None:
            self.erc_band_control.update(line["erc_clip_fraction_off_policy"])
        return line

    def _clip_audit(
        self, log: _StepLog, audited: RolloutBatch, old_logits: torch.Tensor, seed: int
    ) -> dict[str, Any] | None:
        """The update's line of ``clipping.jsonl`` (:func:`~erc_gym.diagnostics.clip_audit` of
        every token, :func:`~erc_gym.diagnostics.state_audit` of the audited sequences)."""
        if not log.stats:
            return None
        audit = clip_audit(log.stats, positions=True, seed=seed) or {}
        erc = self.loss_config.erc
        if old_logits.shape[0]:
            new_logits = response_logits(self.model, audited)
            band = None if erc is None else (erc.low, erc.high)
            temperature = self.config.temperature
            audit |= state_audit(old_logits, new_logits, band, temperature=temperature, seed=seed)
        return audit

    def _step_metrics(
        self,
        batch: RolloutBatch,
        log: _StepLog,
        fill: dict[str, float],
        times: tuple[float, float, float, float],
    ) -> dict[str, Any]:
        t0, t1, t2, t3 = times
        loss = loss_metrics(log.stats)
        off_policy = off_policy_clip_fraction(log.stats)
        with torch.no_grad():
            h = torch.cat([s.entropy.reshape(-1) for s in log.stats if s.entropy is not None])
            h_old = torch.cat(
                [s.old_entropy.reshape(-1) for s in log.stats if s.old_entropy is not None]
            )
            v = torch.cat([s.valid.reshape(-1) for s in log.stats if s.valid is not None])
            rho = ((h + 1e-8) / (h_old + 1e-8))[v].float()
            q = (
                torch.quantile(rho, torch.tensor([0.05, 0.5, 0.95], device=rho.device)).tolist()
                if rho.numel()
                else [math.nan] * 3
            )
        n_tokens = int(batch.response_mask.sum()) * (1 + self.config.epochs)
        line: dict[str, Any] = {
            "step": self.step,
            "response_length": float(batch.response_mask.sum(1).float().mean()),
            "entropy": loss.get("entropy_mean", math.nan),
            "entropy_old": loss.get("entropy_old_mean", math.nan),
            "entropy_ratio_q05": q[0],
            "entropy_ratio_q50": q[1],
            "entropy_ratio_q95": q[2],
            "entropy_ratio_hist": ratio_histogram(rho),
            "grad_norm": float(np.mean(log.grad_norms)) if log.grad_norms else math.nan,
            "erc_clip_fraction_off_policy": math.nan if off_policy is None else off_policy,
            # the band this step trained with (it moves under erc_target_clip_fraction)
            "erc_low": math.nan if self.loss_config.erc is None else self.loss_config.erc.low,
            "erc_high": math.nan if self.loss_config.erc is None else self.loss_config.erc.high,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "tokens_per_second": n_tokens / max(t3 - t0, 1e-9),
            "time_generate": t1 - t0,
            "time_score": t2 - t1,
            "time_train": t3 - t2,
            **fill,
            "nan_rewards": self.nan_rewards,
            "skipped_steps": self.skipped_steps,
            "update_steps": log.update_steps,
        }
        line |= {k: v for k, v in loss.items() if k not in ("entropy_mean", "entropy_old_mean")}
        return line

    # ------------------------------------------------------------------ evaluation

    def _correct(
        self, problems: list[Problem], samples: int, greedy: bool, top_p: float = 1.0
    ) -> torch.Tensor:
        """``(len(problems), samples)``: whether each response to each problem is correct."""
        c = self.config
        per_batch = max(1, 128 // samples)
        correct = []
        for start in range(0, len(problems), per_batch):
            batch = generate(
                self.model,
                self.tokenizer,
                problems[start : start + per_batch],
                samples,
                self.verifier,
                max_new_tokens=c.max_new_tokens,
                temperature=c.temperature,
                top_p=top_p,
                greedy=greedy,
                max_prompt_tokens=self.max_prompt_tokens,
            )
            correct.append((batch.rewards > 0.5).reshape(-1, samples))
        return torch.cat(correct)

    def evaluate(self, problems: list[Problem] | None = None) -> dict[str, float]:
        """Held-out accuracy: one response per prompt, greedy unless ``eval_greedy=False``.

        Returns ``eval_accuracy``, and with ``eval_pass_k`` the sampled ``eval_pass_at_k`` and
        ``eval_sampled_accuracy`` (at ``temperature`` and ``top_p``, as training samples). The
        pass@k samples come from a generator seeded by the run's seed and step, so they never
        change the training's random stream.
        """
        problems = self.eval_problems if problems is None else problems
        c = self.config
        correct = self._correct(problems, 1, c.eval_greedy)
        out = {"eval_accuracy": float(correct.float().mean())}
        if c.eval_pass_k > 0:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed((c.seed * 1_000_003 + self.step) % 2**63)
                sampled = self._correct(problems, c.eval_pass_k, greedy=False, top_p=c.top_p)
            out["eval_pass_at_k"] = float(sampled.any(1).float().mean())
            out["eval_sampled_accuracy"] = float(sampled.float().mean())
        return out

    def _scored(self, evaluation: dict[str, float]) -> dict[str, float]:
        """``evaluation`` with ``eval_score``: the mean accuracy of the last ``score_evals``
        evaluations, this one included (fewer at the start of a run)."""
        self._eval_history.append(evaluation["eval_accuracy"])
        last = self._eval_history[-self.config.score_evals :]
        return {**evaluation, "eval_score": float(np.mean(last))}

    # ------------------------------------------------------------------ run, save, resume

    def _checkpoint_path(self) -> Path:
        return self.run_path / "checkpoint.pt"

    def save_checkpoint(self, export: bool = True) -> None:
        """Model, optimiser, scheduler, RNG states and step, to ``run_dir/name/checkpoint.pt``.

        Args:
            export: also write the model and tokenizer with ``save_pretrained`` to
                ``run_dir/name/model`` (done at the end of a run, not at periodic checkpoints).
        """
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "skipped_steps": self.skipped_steps,
            "nan_rewards": self.nan_rewards,
            "methods": self.methods.state_dict(),
        }
        if self.erc_band_control is not None:
            state["erc_band"] = self.erc_band_control.state_dict()
        path = self._checkpoint_path()
        previous = self.run_path / CHECKPOINTS[1]
        if path.exists():  # keep it as checkpoint.prev.pt (a second name for the same file)
            link = previous.with_name(f".{previous.name}.link")
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
                os.replace(link, previous)
            except OSError:  # no hard links on this file system: the last checkpoint only
                link.unlink(missing_ok=True)
        # temporary file + rename: a kill or a full disk mid-save leaves the previous one intact
        with atomic_open(path) as f:
            torch.save(state, f)
        self.saved_step = self.step
        if export:
            from transformers.utils import logging as hf_logging

            # progress=False means a quiet stderr: transformers' "Writing model shards" bar too
            shown = hf_logging.is_progress_bar_enabled()
            if not self.config.progress:
                hf_logging.disable_progress_bar()
            try:
                self._export(self.run_path / "model")
            finally:
                if shown:
                    hf_logging.enable_progress_bar()

    def _export(self, folder: Path) -> None:
        """``save_pretrained`` into a new folder that then replaces ``folder`` (a failed export,
        e.g. on a full disk, keeps the previous one)."""
        new = folder.with_name(f".{folder.name}.new")
        old = folder.with_name(f".{folder.name}.old")
        for stale in (new, old):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            self.model.save_pretrained(new)
            self.tokenizer.save_pretrained(new)
        except Exception as err:
            shutil.rmtree(new, ignore_errors=True)
            if isinstance(err, OSError):
                raise OSError(err.errno, err.strerror, err.filename or str(folder)) from err
            if "No space left on device" in str(err):  # safetensors' own error type
                raise OSError(28, os.strerror(28), str(folder)) from err
            raise
        if folder.exists():
            folder.rename(old)
        new.rename(folder)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        """Restore the newest intact checkpoint if there is one; returns whether it did.

        A damaged ``checkpoint.pt`` (a truncated file) is passed over for ``checkpoint.prev.pt``
        with a warning naming both.

        Raises:
            ValueError: the run folder has checkpoints and none can be read.
        """
        found = find_checkpoint(self.run_path)
        if found is None:
            return False
        if found.damaged:
            warnings.warn(
                f"damaged checkpoint {' and '.join(found.damaged)}; resuming from {found.path} "
                f"(step {found.step})",
                stacklevel=2,
            )
        try:
            state = torch.load(found.path, map_location=self.device, weights_only=False)
        except Exception as err:
            raise ValueError(f"damaged checkpoint {found.path}: {err}") from err
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_gen.set_state(state["data_gen"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        self.step = state["step"]
        self.saved_step = self.step
        self.skipped_steps = state["skipped_steps"]
        self.nan_rewards = state["nan_rewards"]
        if self.erc_band_control is not None and "erc_band" in state:
            self.erc_band_control.load_state_dict(state["erc_band"])
        if "methods" in state:
            self.methods.load_state_dict(state["methods"])
        return True

    def _write(self, line: dict[str, float]) -> None:
        append_jsonl(self.run_path / "metrics.jsonl", line)
        if self._audit is not None and line["step"] > 0:
            append_jsonl(self.run_path / CLIPPING_FILE, {"step": line["step"], **self._audit})
            self._audit = None
        if self._tb is not None:
            for k, v in line.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, self.step)

    def check_resume(self) -> None:
        """Refuse to continue a run folder made with other settings (see :func:`check_resume`).

        Raises:
            ValueError: naming every differing setting, old and new value.
        """
        check_resume(self.config)

    def _clear_run(self) -> None:
        """Delete a previous run's checkpoint, metrics, exported model and TensorBoard files."""
        for name in (*CHECKPOINTS, "checkpoint.tmp", "metrics.jsonl", CLIPPING_FILE):
            (self.run_path / name).unlink(missing_ok=True)
        for name in ("model", "tb"):
            shutil.rmtree(self.run_path / name, ignore_errors=True)

    def _truncate_metrics(self) -> None:
        """Keep the metrics lines up to the restored checkpoint; the rest is recomputed.

        A partial last line (a kill mid-write) is dropped first, so it never blocks a resume.
        """
        for path in (self.run_path / "metrics.jsonl", self.run_path / CLIPPING_FILE):
            if not path.exists():
                continue
            if self.step == 0:  # nothing restored: every line will be written again
                path.unlink()
                continue
            truncate_metrics(path, "step", self.step)

    def train(self, resume: bool = True, max_steps: int | None = None) -> list[dict[str, float]]:
        """Run (or continue) training; returns the metrics lines written by this call.

        A checkpoint is written every ``save_every`` steps, every ``save_minutes`` minutes and
        at the end. Resuming restores the last one and recomputes only the steps after it, with
        the same results as an uninterrupted run.

        Args:
            resume: continue from ``checkpoint.pt`` in the run folder if it exists (the run's
                recorded settings must match, see :meth:`check_resume`); ``False`` starts over
                and deletes the folder's previous checkpoint and metrics.
            max_steps: stop after this many steps in total (for tests / stop-and-resume);
                defaults to ``config.steps``.

        Raises:
            ValueError: ``resume`` with a run folder made with other settings.
        """
        c = self.config
        if resume:
            self.check_resume()
        self.run_path.mkdir(parents=True, exist_ok=True)
        if not resume:
            self._clear_run()
        # keep what others recorded beside the settings (the experiment runner's variant, kind,
        # ...), so that a run stopped before its end is still found and reported as a grid run
        merge_json(self.run_path / "config.json", dataclasses.asdict(c))
        if not (resume and find_checkpoint(self.run_path)):
            self._warm_start()  # deferred by __init__ when the folder had checkpoints
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        np.random.seed(c.seed)
        if resume:
            self.load_checkpoint()
        self._truncate_metrics()
        if c.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_path / "tb"))
        last = min(c.steps, max_steps if max_steps is not None else c.steps)
        lines: list[dict[str, float]] = []
        # the evaluations the restored run already made (the score averages the last few)
        self._eval_history = [
            float(row["eval_accuracy"])
            for row in read_jsonl(self.run_path / "metrics.jsonl")
            if isinstance(row.get("eval_accuracy"), float | int)
        ]
        if self.step == 0:
            first = {"step": 0, **self._scored(self.evaluate())}
            self._write(first)
            lines.append(first)
        bar: Any = None
        if c.progress:
            from tqdm import tqdm

            bar = tqdm(total=last, initial=self.step, desc=c.name)
        saved_at = time.monotonic()
        while self.step < last:
            line = self.train_step()
            if self.step % c.eval_every == 0 or self.step == c.steps:
                line |= self._scored(self.evaluate())
            self._write(line)
            lines.append(line)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    reward=f"{line.get('reward', math.nan):.2f}",
                    erc=f"{line.get('erc_clip_fraction', math.nan):.2f}",
                )
            due_steps = c.save_every and self.step % c.save_every == 0
            due_time = c.save_minutes and time.monotonic() - saved_at >= 60 * c.save_minutes
            if (due_steps or due_time) and self.step < last:
                self.save_checkpoint(export=False)
                saved_at = time.monotonic()
        if bar is not None:
            bar.close()
        self.save_checkpoint()
        if self._tb is not None:
            self._tb.close()
        return lines
