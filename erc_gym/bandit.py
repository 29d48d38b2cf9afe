"""Group-relative policy optimisation on :class:`~erc_gym.envs.vocab_bandit.VocabBandit`.

The toy counterpart of the LLM trainer: a softmax policy over ``V`` actions per context (one logit
per context and action, like an LLM's output layer, or the env's prior plus a low-rank correction
shared by all contexts), started from the env's pretrained-like prior. Each iteration samples
``group`` actions per context, computes GRPO advantages within each context, and takes
``minibatches`` off-policy Adam steps with :func:`erc_gym.losses.policy_loss`.

Because the whole action distribution is known, each iteration also measures what PPO-clip's
sampled-action ratio cannot see (:mod:`erc_gym.diagnostics`): the drift on un-sampled actions and
the per-context entropy change. One JSON line per iteration goes to ``metrics.jsonl``
(keys: :data:`BANDIT_METRIC_KEYS`).

Example:
    >>> from erc_gym.bandit import BanditConfig, train_bandit
    >>> rows = train_bandit(BanditConfig(vocab_size=64, iterations=2, erc_low=0.95, erc_high=1.05))
    >>> sorted(rows[-1])[:3]
    ['approx_kl', 'clip_fraction', 'entropy']
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erc_gym.adaptive_band import (
    AdaptiveERCBand,
    check_target_clip_fraction,
    off_policy_clip_fraction,
)
from erc_gym.advantages import group_advantages
from erc_gym.atomic import atomic_open, merge_json
from erc_gym.diagnostics import (
    CLIPPING_FILE,
    audit_seed,
    clip_audit,
    ratio_histogram,
    state_audit,
    unsampled_drift,
)
from erc_gym.entropy import entropy_from_logits, kl_from_logits, logprob_and_entropy
from erc_gym.jsonl import append_jsonl, truncate_metrics
from erc_gym.limits import MAX_SEED
from erc_gym.losses import (
    LossConfig,
    LossStats,
    clip_flags,
    entropy_ratio,
    loss_metrics,
    policy_loss,
)
from erc_gym.methods import MethodRuntime, MethodSettings, method_metrics

__all__ = ["BANDIT_METRIC_KEYS", "BanditConfig", "RolloutDrift", "rollout_drift", "train_bandit"]

#: Keys of every ``metrics.jsonl`` line (after the first, which is the untrained prior).
BANDIT_METRIC_KEYS = (
    "step",
    "iteration",
    "reward",
    "expected_reward",
    "entropy",
    "entropy_old",
    "abs_entropy_change",
    "max_abs_log_entropy_ratio",
    "tv_unsampled",
    "sampled_ratio_min",
    "sampled_ratio_max",
    "sampled_outside_clip",
    "clip_fraction",
    "erc_clip_fraction",
    "erc_clip_fraction_off_policy",
    "erc_low",
    "erc_high",
    "erc_clipped_entropy_old_mean",
    "erc_kept_entropy_old_mean",
    "approx_kl",
    "grad_norm",
    "entropy_ratio_hist",
    "update_steps",
)


@dataclass
class BanditConfig(MethodSettings):
    """One VocabBandit run (env, policy, optimiser, loss).

    The rival methods, baselines and controls (:class:`~erc_gym.methods.MethodSettings`: token
    gates, entropy bonus, KL penalty, DPPO, the equal-step control, ``target_kl``) are settings of
    this config too; all are off by default. A KL penalty uses the exact per-context
    KL(pi_old || pi) of the full distributions.
    """

    vocab_size: int = 4096
    """Actions per context, ``V``."""
    num_contexts: int = 16
    """Contexts (states), ``K``."""
    reward_set_size: int = 4
    """Rewarded actions per context."""
    sharp_fraction: float = 0.5
    """Share of near-deterministic contexts in the prior."""
    policy: str = "tabular"
    """``tabular`` (free logits per context) or ``shared`` (prior + rank-8 shared correction)."""
    iterations: int = 40
    """Sampled batches."""
    group: int = 16
    """Samples per context and batch (the GRPO group)."""
    minibatches: int = 8
    """Off-policy Adam steps per batch (one per mini-batch; the first is on-policy)."""
    lr: float = 0.05
    """Adam learning rate."""
    loss: str = "ppo"
    """``ppo``, ``dapo`` or ``gppo`` (see :meth:`erc_gym.losses.LossConfig.named`)."""
    erc_low: float | None = None
    """Lower ERC bound; None with ``erc_high=None`` turns ERC off."""
    erc_high: float | None = None
    """Upper ERC bound."""
    erc_target_clip_fraction: float | None = None
    """This project's adaptive band (not the paper's; :mod:`erc_gym.adaptive_band`): after each
    batch, widen or narrow the band so that ERC clips about this share of the off-policy samples.
    The band starts at (``erc_low``, ``erc_high``). None: the fixed band (the paper's)."""
    seed: int = 0
    """Seed of the task (prior, rewarded sets) and of the sampling."""
    save_every: int = 10
    """Iterations between checkpoints (0: only at the end)."""
    log_time: bool = False
    """Also log ``time_update``: the wall time of each batch's optimiser steps, in seconds (off
    by default, so that two runs of one seed write the same log)."""

    def loss_config(self) -> LossConfig:
        """The :class:`~erc_gym.losses.LossConfig` of this run."""
        # the bandit has the full distributions: the KL penalty is exact
        base = LossConfig.named(self.loss, self.erc_low, self.erc_high)
        return self.apply_to(base, kl_estimator="exact")

    def validate(self) -> None:
        """Raise ``ValueError`` on an inconsistent configuration."""
        self.loss_config()  # checks the methods too
        check_target_clip_fraction(self.erc_target_clip_fraction, self.erc_low, self.erc_high)
        if self.policy not in ("tabular", "shared"):
            raise ValueError(f"policy must be 'tabular' or 'shared', got {self.policy!r}")
        for name in ("iterations", "group", "minibatches", "num_contexts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.group < 2:
            raise ValueError(f"group must be >= 2 for group advantages, got group={self.group}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got lr={self.lr}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**32 - 1], got seed={self.seed}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got save_every={self.save_every}")
        from erc_gym.envs.vocab_bandit import check_task

        check_task(self.vocab_size, self.num_contexts, self.reward_set_size, self.sharp_fraction)


@dataclass
class _Batch:
    """One sampled batch: the old logits ``(K, V)``, actions and advantages ``(K * group,)``."""

    old_logits: torch.Tensor
    actions: torch.Tensor
    advantages: torch.Tensor


class _Policy(torch.nn.Module):
    def __init__(self, prior: torch.Tensor, kind: str, gen: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("prior", prior)
        self.kind = kind
        if kind == "tabular":
            self.table = torch.nn.Parameter(prior.clone())
        else:
            k, v = prior.shape
            self.ctx = torch.nn.Parameter(0.1 * torch.randn(k, 8, generator=gen))
            self.vocab = torch.nn.Parameter(torch.zeros(8, v))

    def forward(self) -> torch.Tensor:
        if self.kind == "tabular":
            return self.table
        prior: torch.Tensor = self.prior  # type: ignore[assignment]
        return prior + self.ctx @ self.vocab


def _setup(
    c: BanditConfig,
) -> tuple[_Policy, torch.optim.Optimizer, torch.Tensor, torch.Tensor, torch.Generator]:
    """Validate ``c``; the policy at the env's prior, its optimiser, rewards, contexts, RNG."""
    from erc_gym.envs.vocab_bandit import VocabBandit

    c.validate()
    env = VocabBandit(
        vocab_size=c.vocab_size,
        num_contexts=c.num_contexts,
        reward_set_size=c.reward_set_size,
        sharp_fraction=c.sharp_fraction,
        task_seed=c.seed,
    )
    reward_mask = torch.as_tensor(env.reward_mask, dtype=torch.float32)
    gen = torch.Generator().manual_seed(c.seed)
    policy = _Policy(torch.as_tensor(env.prior_logits.copy()), c.policy, gen)
    opt = torch.optim.Adam(policy.parameters(), lr=c.lr)
    ctx = torch.arange(c.num_contexts).repeat_interleave(c.group)
    return policy, opt, reward_mask, ctx, gen


def train_bandit(
    config: BanditConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = True,
    progress: bool = False,
    max_iterations: int | None = None,
) -> list[dict[str, Any]]:
    """Train (or continue) one run; returns the metrics lines written by this call.

    Args:
        config: the run's :class:`BanditConfig`.
        run_dir: folder for ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt``; None keeps
            everything in memory.
        resume: continue from ``run_dir/checkpoint.pt`` when it exists.
        progress: show a tqdm bar over iterations.
        max_iterations: stop after this many iterations in total (stop-and-resume tests).
    """
    c = config
    policy, opt, reward_mask, ctx, gen = _setup(c)
    loss_config = c.loss_config()
    adaptive = None
    if c.erc_target_clip_fraction is not None and loss_config.erc is not None:
        adaptive = AdaptiveERCBand(
            c.erc_target_clip_fraction, low=loss_config.erc.low, high=loss_config.erc.high
        )
    methods = MethodRuntime(c, c.seed)
    batch = len(ctx)

    path = None if run_dir is None else Path(run_dir)
    start = 0
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        # beside the experiment runner's record of the run (variant, kind), which it writes
        # first: a run stopped before its end is still reported as a run of its variant
        merge_json(path / "config.json", dataclasses.asdict(c))
        ckpt = path / "checkpoint.pt"
        metrics_path = path / "metrics.jsonl"
        if resume and ckpt.exists():
            try:
                state = torch.load(ckpt, weights_only=False)
            except Exception as err:  # a truncated or overwritten file
                raise ValueError(
                    f"damaged checkpoint {ckpt} ({type(err).__name__}: "
                    f"{' '.join(str(err).split()) or 'unreadable'}); delete it to start this run "
                    "over from iteration 0, or restart it (erc-gym experiment --restart)"
                ) from None
            policy.load_state_dict(state["policy"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            if adaptive is not None:
                adaptive.load_state_dict(state["erc_band"])
            if "methods" in state:
                methods.load_state_dict(state["methods"])
            start = state["iteration"]
            truncate_metrics(metrics_path, "iteration", start)
            truncate_metrics(path / CLIPPING_FILE, "iteration", start)
        else:
            metrics_path.unlink(missing_ok=True)
            (path / CLIPPING_FILE).unlink(missing_ok=True)

    def write(line: dict[str, Any], audit: dict[str, Any] | None = None) -> None:
        if path is not None:
            append_jsonl(path / "metrics.jsonl", line)
            if audit:
                append_jsonl(path / CLIPPING_FILE, {"iteration": line["iteration"], **audit})

    def checkpoint(iteration: int) -> None:
        if path is None:
            return
        state = {
            "policy": policy.state_dict(),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "iteration": iteration,
            "methods": methods.state_dict(),
        }
        if adaptive is not None:
            state["erc_band"] = adaptive.state_dict()
        with atomic_open(path / "checkpoint.pt") as f:  # a full disk keeps the previous one
            torch.save(state, f)

    out: list[dict[str, Any]] = []
    if start == 0:
        with torch.no_grad():
            logits = policy()
            first = {
                "step": 0,
                "iteration": 0,
                "expected_reward": float((torch.softmax(logits, -1) * reward_mask).sum(-1).mean()),
                "entropy": float(entropy_from_logits(logits).mean()),
            }
        write(first)
        out.append(first)
    last = c.iterations if max_iterations is None else min(c.iterations, max_iterations)
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=last, initial=start, desc=f"VocabBandit V={c.vocab_size}")
    for it in range(start, last):
        if adaptive is not None:
            loss_config = dataclasses.replace(loss_config, erc=adaptive.band)
        audit: dict[str, Any] | None = {"seed": audit_seed(c.seed, it + 1)} if path else None
        line = _iteration(policy, opt, loss_config, reward_mask, ctx, gen, c, methods, audit=audit)
        if adaptive is not None:
            adaptive.update(line["erc_clip_fraction_off_policy"])
        line = {"step": (it + 1) * batch, "iteration": it + 1, **line}
        write(line, audit)
        out.append(line)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{line['expected_reward']:.3f}")
        if c.save_every and (it + 1) % c.save_every == 0:
            checkpoint(it + 1)
    if bar is not None:
        bar.close()
    checkpoint(last)
    return out


def _iteration(
    policy: _Policy,
    opt: torch.optim.Optimizer,
    loss_config: LossConfig,
    reward_mask: torch.Tensor,
    ctx: torch.Tensor,
    gen: torch.Generator,
    c: BanditConfig,
    methods: MethodRuntime | None = None,
    on_step: Callable[[int, _Batch], None] | None = None,
    audit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One sampled batch and its ``minibatches`` updates; returns the metrics line.

    ``on_step(k, batch)`` is called before the first update (``k = 0``) and after the ``k``-th.
    ``methods`` carries the state of the run's methods (:class:`~erc_gym.methods.MethodRuntime`;
    a fresh one when None). ``audit`` (a dict holding the sample's ``seed``) receives the
    update's :func:`~erc_gym.diagnostics.clip_audit` and
    :func:`~erc_gym.diagnostics.state_audit` (the contexts are the states).
    """
    if methods is None:
        methods = MethodRuntime(c, c.seed)
    with torch.no_grad():
        old_logits = policy().detach().clone()
        old_probs = torch.softmax(old_logits, -1)
        actions = torch.multinomial(old_probs, c.group, replacement=True, generator=gen)
        actions = actions.reshape(-1)
        rewards = reward_mask[ctx, actions]
        adv = group_advantages(rewards, c.group, scale="group")
        old_lp, old_h = logprob_and_entropy(old_logits[ctx], actions)
    perm = torch.randperm(len(actions), generator=gen)
    started = time.perf_counter()
    stats: list[LossStats] = []
    grad_norms = []
    batch = _Batch(old_logits, actions, adv)
    if on_step is not None:
        on_step(0, batch)
    for k, idx in enumerate(perm.chunk(c.minibatches), 1):
        logits = policy()[ctx[idx]]
        lp, h = logprob_and_entropy(logits, actions[idx], entropy_grad=c.needs_entropy_grad)
        pg = policy_loss(
            lp,
            old_lp[idx],
            adv[idx],
            entropy=h,
            old_entropy=old_h[idx],
            config=loss_config,
            metrics=False,
            kl=kl_from_logits(old_logits[ctx[idx]], logits) if c.needs_kl else None,
            **methods.loss_kwargs(),
        )
        stats.append(pg.stats)
        if methods.should_stop(pg.stats):  # SB3: this mini-batch is logged, not trained on
            break
        opt.zero_grad()
        pg.loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), math.inf))
        with methods.scaled_lr(opt, pg):
            opt.step()
        methods.after_step(pg)
        if on_step is not None:
            on_step(k, batch)
    methods.after_update(stats)
    seconds = time.perf_counter() - started
    m = loss_metrics(stats)
    # the entropy ratio of every sample the loss saw (the same formula when ERC is off)
    rho = torch.cat([entropy_ratio(s.entropy, s.old_entropy).reshape(-1) for s in stats])  # type: ignore[arg-type]
    with torch.no_grad():
        new_logits = policy()
        new_probs = torch.softmax(new_logits, -1)
        sampled = torch.zeros_like(old_probs, dtype=torch.bool)
        sampled[ctx, actions] = True
        h_new = entropy_from_logits(new_logits)
        h_old = entropy_from_logits(old_logits)
        ratio = new_probs[ctx, actions] / old_probs[ctx, actions]
    erc = loss_config.erc
    off_policy = off_policy_clip_fraction(stats)
    if audit is not None:
        seed = int(audit.pop("seed", c.seed))
        audit |= clip_audit(stats, seed=seed) or {}
        band = None if erc is None else (erc.low, erc.high)
        audit |= state_audit(old_logits, new_logits, band, seed=seed)
    return {
        "reward": float(rewards.mean()),
        "expected_reward": float((new_probs * reward_mask).sum(-1).mean()),
        "entropy": float(h_new.mean()),
        "entropy_old": float(h_old.mean()),
        "abs_entropy_change": float((h_new - h_old).abs().mean()),
        "max_abs_log_entropy_ratio": float((h_new / h_old).log().abs().max()),
        "tv_unsampled": unsampled_drift(old_probs, new_probs, sampled),
        "sampled_ratio_min": float(ratio.min()),
        "sampled_ratio_max": float(ratio.max()),
        "sampled_outside_clip": float(
            ((ratio < 1 - loss_config.eps_low) | (ratio > 1 + loss_config.eps_high)).float().mean()
        ),
        "clip_fraction": m["clip_fraction"],
        "erc_clip_fraction": m.get("erc_clip_fraction", 0.0),
        "erc_clip_fraction_off_policy": math.nan if off_policy is None else off_policy,
        "erc_low": math.nan if erc is None else erc.low,
        "erc_high": math.nan if erc is None else erc.high,
        "erc_clipped_entropy_old_mean": m.get("erc_clipped_entropy_old_mean", math.nan),
        "erc_kept_entropy_old_mean": m.get("erc_kept_entropy_old_mean", math.nan),
        "approx_kl": m["approx_kl"],
        "grad_norm": float(torch.stack(grad_norms).mean()) if grad_norms else math.nan,
        "entropy_ratio_hist": ratio_histogram(rho),
        "update_steps": len(grad_norms),
        **method_metrics(m),
        **({"time_update": seconds} if c.log_time else {}),
    }


@dataclass
class RolloutDrift:
    """The states of one sampled batch, optimiser step by optimiser step, without and with ERC.

    Row 0 of every array is before the first step (every ratio is 1: the first step is
    on-policy), row ``k`` after the ``k``-th step. The dictionaries have the keys ``"off"``
    (the steps taken without ERC) and ``"erc"`` (the same batch, from the same policy and
    optimiser state, with ERC and :attr:`band`).

    Attributes:
        band: the ERC band, also the band that ``outside`` and ``erc_mask`` refer to.
        contexts: ``(N,)`` the context (state) of each sample.
        advantages: ``(N,)`` the GRPO advantage of each sample.
        outside: ``(S + 1,)`` share of the contexts whose entropy ratio is outside the band.
        entropy_ratio: ``(S + 1, K)`` each context's ``H / H_old``.
        ppo_clip: ``(S + 1, N)`` where PPO-clip's bound is active for the sample (the loss would
            give it no gradient on the next step).
        erc_mask: ``(S + 1, N)`` where the sample's context is outside the band (ERC would
            stop its gradient on the next step).
    """

    band: tuple[float, float]
    contexts: np.ndarray
    advantages: np.ndarray
    outside: dict[str, np.ndarray]
    entropy_ratio: dict[str, np.ndarray]
    ppo_clip: dict[str, np.ndarray]
    erc_mask: dict[str, np.ndarray]


def rollout_drift(config: BanditConfig, *, warmup: int = 0) -> RolloutDrift:
    """Measure one rollout's ``config.minibatches`` steps one by one, with ERC off and on.

    After ``warmup`` ordinary iterations (with ``config``'s own loss), one batch is sampled and
    its mini-batch steps are taken twice from the same policy and optimiser state: once without
    ERC and once with the band ``(config.erc_low, config.erc_high)`` (the paper's
    ``(0.95, 1.05)`` when ERC is off in ``config``). Nothing is written to disk.

    Example:
        >>> d = rollout_drift(BanditConfig(vocab_size=64, minibatches=4))
        >>> d.outside["off"].shape
        (5,)
    """
    c = dataclasses.replace(config, erc_target_clip_fraction=None)
    band = (0.95, 1.05) if c.erc_low is None or c.erc_high is None else (c.erc_low, c.erc_high)
    policy, opt, reward_mask, ctx, gen = _setup(c)
    for _ in range(warmup):
        _iteration(policy, opt, c.loss_config(), reward_mask, ctx, gen, c)
    start = (
        {k: v.clone() for k, v in policy.state_dict().items()},
        copy.deepcopy(opt.state_dict()),
        gen.get_state(),
    )
    losses = {
        "off": LossConfig.named(c.loss, None, None),
        "erc": LossConfig.named(c.loss, *band),
    }
    seen: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    batch_seen: list[_Batch] = []
    for name, loss_config in losses.items():
        policy.load_state_dict(start[0])
        opt.load_state_dict(copy.deepcopy(start[1]))
        gen.set_state(start[2])
        rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

        def record(
            k: int,
            batch: _Batch,
            rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = rows,
            loss_config: LossConfig = loss_config,
        ) -> None:
            with torch.no_grad():
                logits = policy()
                rho = entropy_ratio(
                    entropy_from_logits(logits), entropy_from_logits(batch.old_logits)
                )
                log_ratio = torch.log_softmax(logits, -1) - torch.log_softmax(batch.old_logits, -1)
                ratio = log_ratio[ctx, batch.actions].exp()
                flags = clip_flags(
                    ratio,
                    batch.advantages,
                    eps_low=loss_config.eps_low,
                    eps_high=loss_config.eps_high,
                    dual_clip_c=loss_config.dual_clip_c,
                )
            clipped = flags["clip_low"] | flags["clip_high"] | flags["dual_clip"]
            rows.append((rho.numpy(), clipped.numpy(), ratio.numpy()))
            if k == 0:
                batch_seen.append(batch)

        _iteration(policy, opt, loss_config, reward_mask, ctx, gen, c, on_step=record)
        seen[name] = rows
    rho_by = {name: np.stack([r[0] for r in rows]) for name, rows in seen.items()}
    out_ctx = {name: (r <= band[0]) | (r >= band[1]) for name, r in rho_by.items()}
    contexts = ctx.numpy()
    return RolloutDrift(
        band=band,
        contexts=contexts,
        advantages=batch_seen[0].advantages.numpy(),
        outside={name: o.mean(axis=1) for name, o in out_ctx.items()},
        entropy_ratio=rho_by,
        ppo_clip={name: np.stack([r[1] for r in rows]) for name, rows in seen.items()},
        erc_mask={name: o[:, contexts] for name, o in out_ctx.items()},
    )
