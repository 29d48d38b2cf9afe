"""Demonstration: PPO-clip moves probability on un-sampled actions; ERC limits the drift.

On ``erc_gym/VocabBandit-v0`` a tabular softmax policy (one logit per context and action, as an
LLM's output layer) starts from the env's pretrained-like prior. Each iteration samples a batch
(``group`` actions per context), computes GRPO advantages per context, and takes ``minibatches``
off-policy Adam steps on it, with PPO-clip alone or PPO-clip + ERC. After each batch's updates it
measures, against the policy that sampled the batch:

* ``tv_unsampled`` -- total variation restricted to the actions *not* sampled in that context,
  ``0.5 * sum_{a unsampled} |p_new(a) - p_old(a)|``, averaged over contexts;
* ``|dH|`` -- mean absolute entropy change per context, and the largest ``|log H_new/H_old|``;
* ``ratio range`` / ``outside clip`` -- min and max of the importance ratio of the *sampled*
  actions and the share outside ``[1 - eps, 1 + eps]``; PPO-clip's guard sees only these.

Usage::

    python experiments/vocab_drift.py                  # V in {16, 256, 4096}, 3 seeds
    python experiments/vocab_drift.py --vocab 4096 --iterations 5
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from erc_gym.advantages import group_advantages
from erc_gym.entropy import entropy_from_logits, logprob_and_entropy
from erc_gym.envs.vocab_bandit import VocabBandit
from erc_gym.losses import ERCConfig, LossConfig, policy_loss


def run(
    vocab: int,
    config: LossConfig,
    *,
    seed: int,
    iterations: int,
    group: int,
    minibatches: int,
    lr: float,
    contexts: int,
    sharp_fraction: float = 0.5,
    policy: str = "tabular",
) -> dict[str, float]:
    """One training run; returns the per-batch drift statistics averaged over iterations."""
    env = VocabBandit(
        vocab_size=vocab, num_contexts=contexts, sharp_fraction=sharp_fraction, task_seed=seed
    )
    reward_mask = torch.as_tensor(env.reward_mask, dtype=torch.float32)
    prior = torch.as_tensor(env.prior_logits.copy())
    gen = torch.Generator().manual_seed(seed)
    if policy == "tabular":
        table = prior.clone().requires_grad_(True)
        params = [table]

        def policy_logits() -> torch.Tensor:
            return table
    else:
        # prior + a rank-8 correction whose vocabulary side is shared by all contexts, as an LLM
        # shares its weights across states: a step in one context moves every other context too
        ctx_emb = (0.1 * torch.randn(contexts, 8, generator=gen)).requires_grad_(True)
        vocab_emb = torch.zeros(8, vocab, requires_grad=True)
        params = [ctx_emb, vocab_emb]

        def policy_logits() -> torch.Tensor:
            return prior + ctx_emb @ vocab_emb

    opt = torch.optim.Adam(params, lr=lr)
    ctx = torch.arange(contexts).repeat_interleave(group)
    stats: dict[str, list[float]] = {
        k: [] for k in ("tv_unsampled", "abs_dH", "max_abs_log_h_ratio", "ratio_min", "ratio_max")
    }
    stats["reward"] = []
    stats["sampled_outside_clip"] = []
    stats["erc_clip_fraction"] = []
    for _ in range(iterations):
        with torch.no_grad():
            old_logits = policy_logits().detach().clone()
            old_probs = torch.softmax(old_logits, -1)
            actions = torch.multinomial(old_probs, group, replacement=True, generator=gen)
            actions = actions.reshape(-1)
            rewards = reward_mask[ctx, actions]
            adv = group_advantages(rewards, group, scale="group")
            old_lp, old_h = logprob_and_entropy(old_logits[ctx], actions)
        stats["reward"].append(float(rewards.mean()))
        perm = torch.randperm(len(actions), generator=gen)
        erc_fracs = []
        for idx in perm.chunk(minibatches):
            lp, h = logprob_and_entropy(policy_logits()[ctx[idx]], actions[idx])
            out = policy_loss(
                lp, old_lp[idx], adv[idx], entropy=h, old_entropy=old_h[idx], config=config
            )
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            erc_fracs.append(out.metrics.get("erc_clip_fraction", 0.0))
        with torch.no_grad():
            new_logits = policy_logits()
            new_probs = torch.softmax(new_logits, -1)
            sampled = torch.zeros_like(old_probs, dtype=torch.bool)
            sampled[ctx, actions] = True
            diff = (new_probs - old_probs).abs()
            tv_u = 0.5 * (diff * ~sampled).sum(-1)
            h_new = entropy_from_logits(new_logits)
            h_old = entropy_from_logits(old_logits)
            ratio = new_probs[ctx, actions] / old_probs[ctx, actions]
        stats["tv_unsampled"].append(float(tv_u.mean()))
        stats["abs_dH"].append(float((h_new - h_old).abs().mean()))
        stats["max_abs_log_h_ratio"].append(float((h_new / h_old).log().abs().max()))
        stats["ratio_min"].append(float(ratio.min()))
        stats["ratio_max"].append(float(ratio.max()))
        eps = (config.eps_low, config.eps_high)
        outside = (ratio < 1 - eps[0]) | (ratio > 1 + eps[1])
        stats["sampled_outside_clip"].append(float(outside.float().mean()))
        stats["erc_clip_fraction"].append(statistics.mean(erc_fracs))
    out = {k: statistics.mean(v) for k, v in stats.items() if k not in ("ratio_min", "ratio_max")}
    out["ratio_min"] = min(stats["ratio_min"])
    out["ratio_max"] = max(stats["ratio_max"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10, help="batches per run")
    parser.add_argument("--group", type=int, default=16, help="samples per context and batch")
    parser.add_argument("--minibatches", type=int, default=8, help="off-policy steps per batch")
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on logits")
    parser.add_argument(
        "--policy",
        choices=["tabular", "shared"],
        default="tabular",
        help="tabular logits, or prior + a low-rank correction shared by contexts",
    )
    parser.add_argument(
        "--sharp-fraction",
        type=float,
        default=0.5,
        help="share of near-deterministic contexts in the prior",
    )
    args = parser.parse_args()
    variants = {
        "PPO-clip": LossConfig.ppo(),
        "PPO-clip + ERC(0.95,1.05)": LossConfig.ppo(erc=ERCConfig(0.95, 1.05)),
    }
    print(
        f"VocabBandit, {args.policy} policy, {args.contexts} contexts x {args.group} samples, "
        f"{args.minibatches} off-policy Adam steps per batch (lr {args.lr}), "
        f"{args.iterations} batches, {args.seeds} seeds; "
        "means over batches and seeds, ratio range over all"
    )
    header = (
        f"{'V':>6} {'variant':<26} {'TV unsampled':>12} {'|dH| nats':>10} {'max|log rho|':>12} "
        f"{'sampled ratio range':>20} {'outside clip':>12} {'ERC clip':>9} {'reward':>7}"
    )
    print(header)
    for vocab in args.vocab:
        for name, cfg in variants.items():
            runs = [
                run(
                    vocab,
                    cfg,
                    seed=s,
                    iterations=args.iterations,
                    group=args.group,
                    minibatches=args.minibatches,
                    lr=args.lr,
                    contexts=args.contexts,
                    sharp_fraction=args.sharp_fraction,
                    policy=args.policy,
                )
                for s in range(args.seeds)
            ]
            avg = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
            lo = min(r["ratio_min"] for r in runs)
            hi = max(r["ratio_max"] for r in runs)
            print(
                f"{vocab:>6} {name:<26} {avg['tv_unsampled']:>12.4f} {avg['abs_dH']:>10.4f} "
                f"{avg['max_abs_log_h_ratio']:>12.3f} {f'[{lo:.3f}, {hi:.3f}]':>20} "
                f"{avg['sampled_outside_clip']:>12.3f} "
                f"{avg['erc_clip_fraction']:>9.3f} {avg['reward']:>7.3f}"
            )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
