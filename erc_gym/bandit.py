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

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erc_gym.adaptive_band import (
    AdaptiveERCBand,
    check_target_clip_fraction,
    off_policy_clip_fraction,
)
from erc_gym.advantages import group_advantages
from erc_gym.diagnostics import ratio_histogram, unsampled_drift
from erc_gym.entropy import entropy_from_logits, logprob_and_entropy
from erc_gym.jsonl import append_jsonl
from erc_gym.losses import LossConfig, LossStats, entropy_ratio, loss_metrics, policy_loss

__all__ = ["BANDIT_METRIC_KEYS", "BanditConfig", "train_bandit"]

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
)


@dataclass
class BanditConfig:
    """One VocabBandit run (env, policy, optimiser, loss)."""

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

    def loss_config(self) -> LossConfig:
        """The :class:`~erc_gym.losses.LossConfig` of this run."""
        return LossConfig.named(self.loss, self.erc_low, self.erc_high)

    def validate(self) -> None:
        """Raise ``ValueError`` on an inconsistent configuration."""
        self.loss_config()
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
        from erc_gym.cli_args import MAX_SEED

        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**32 - 1], got seed={self.seed}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got save_every={self.save_every}")
        from erc_gym.envs.vocab_bandit import check_task

        check_task(self.vocab_size, self.num_contexts, self.reward_set_size, self.sharp_fraction)


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
    from erc_gym.envs.vocab_bandit import VocabBandit

    config.validate()
    c = config
    env = VocabBandit(
        vocab_size=c.vocab_size,
        num_contexts=c.num_contexts,
        reward_set_size=c.reward_set_size,
        sharp_fraction=c.sharp_fraction,
        task_seed=c.seed,
    )
    loss_config = c.loss_config()
    adaptive = None
    if c.erc_target_clip_fraction is not None and loss_config.erc is not None:
        adaptive = AdaptiveERCBand(
            c.erc_target_clip_fraction, low=loss_config.erc.low, high=loss_config.erc.high
        )
    reward_mask = torch.as_tensor(env.reward_mask, dtype=torch.float32)
    gen = torch.Generator().manual_seed(c.seed)
    policy = _Policy(torch.as_tensor(env.prior_logits.copy()), c.policy, gen)
    opt = torch.optim.Adam(policy.parameters(), lr=c.lr)
    ctx = torch.arange(c.num_contexts).repeat_interleave(c.group)
    batch = len(ctx)

    path = None if run_dir is None else Path(run_dir)
    start = 0
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(dataclasses.asdict(c), indent=2))
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
            start = state["iteration"]
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["iteration"] <= start]
            metrics_path.write_text("".join(k + "\n" for k in kept))
        else:
            metrics_path.unlink(missing_ok=True)

    def write(line: dict[str, Any]) -> None:
        if path is not None:
            append_jsonl(path / "metrics.jsonl", line)

    def checkpoint(iteration: int) -> None:
        if path is None:
            return
        state = {
            "policy": policy.state_dict(),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "iteration": iteration,
        }
        if adaptive is not None:
            state["erc_band"] = adaptive.state_dict()
        torch.save(state, path / "checkpoint.tmp")
        (path / "checkpoint.tmp").replace(path / "checkpoint.pt")

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
        line = _iteration(policy, opt, loss_config, reward_mask, ctx, gen, c)
        if adaptive is not None:
            adaptive.update(line["erc_clip_fraction_off_policy"])
        line = {"step": (it + 1) * batch, "iteration": it + 1, **line}
        write(line)
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
) -> dict[str, Any]:
    """One sampled batch and its ``minibatches`` updates; returns the metrics line."""
    with torch.no_grad():
        old_logits = policy().detach().clone()
        old_probs = torch.softmax(old_logits, -1)
        actions = torch.multinomial(old_probs, c.group, replacement=True, generator=gen)
        actions = actions.reshape(-1)
        rewards = reward_mask[ctx, actions]
        adv = group_advantages(rewards, c.group, scale="group")
        old_lp, old_h = logprob_and_entropy(old_logits[ctx], actions)
    perm = torch.randperm(len(actions), generator=gen)
    stats: list[LossStats] = []
    grad_norms = []
    for idx in perm.chunk(c.minibatches):
        lp, h = logprob_and_entropy(policy()[ctx[idx]], actions[idx])
        pg = policy_loss(
            lp,
            old_lp[idx],
            adv[idx],
            entropy=h,
            old_entropy=old_h[idx],
            config=loss_config,
            metrics=False,
        )
        opt.zero_grad()
        pg.loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), math.inf))
        opt.step()
        stats.append(pg.stats)
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
        "grad_norm": float(torch.stack(grad_norms).mean()),
        "entropy_ratio_hist": ratio_histogram(rho),
    }
