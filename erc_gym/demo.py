"""A one-minute look at what ERC does: PPO vs PPO+ERC on a toy batch of softmax policies.

A batch of ``B`` states, each with a categorical policy over ``V`` actions given by free logits
(a "tabular" policy, as the last layer of an LLM would be), some states near-deterministic and
some high-entropy. One batch of actions is sampled from the old policy and reused for several
off-policy optimiser steps -- exactly the regime in which ERC acts. For each step the demo prints
the loss, the gradient norm, the clip fractions and how far the entropy moved.
"""

from __future__ import annotations

import argparse

import torch

from erc_gym.cli_args import CliParser, fail, positive_float, positive_int
from erc_gym.cli_args import seed as seed_type
from erc_gym.entropy import logprob_and_entropy
from erc_gym.losses import ERCConfig, LossConfig, policy_loss

#: Most logits (batch x vocab) the demo takes: 2**24 floats, 64 MB a tensor.
MAX_LOGITS = 2**24


def toy_batch(batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Old-policy logits (half near-deterministic states), sampled actions, advantages."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g)
    sharp = torch.arange(batch) % 2 == 0
    logits[sharp, 0] += 9.0
    actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
    advantages = torch.randn(batch, generator=g)
    return logits, actions, advantages


def run(
    config: LossConfig, *, batch: int, vocab: int, steps: int, lr: float, seed: int
) -> list[dict[str, float]]:
    """Take ``steps`` Adam steps on one batch; return one metrics dict per step."""
    old_logits, actions, adv = toy_batch(batch, vocab, seed)
    old_lp, old_h = logprob_and_entropy(old_logits, actions)
    logits = old_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    history = []
    for _ in range(steps):
        lp, h = logprob_and_entropy(logits, actions)
        out = policy_loss(lp, old_lp, adv, entropy=h, old_entropy=old_h, config=config)
        opt.zero_grad()
        out.loss.backward()
        assert logits.grad is not None
        grad_norm = logits.grad.norm().item()
        opt.step()
        history.append({"loss": out.loss.item(), "grad_norm": grad_norm, **out.metrics})
    return history


def _vocab(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 actions per state, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``erc-gym demo`` / ``python -m erc_gym.demo``."""
    parser = CliParser(prog="erc-gym demo", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=positive_int, default=64, help="states in the toy batch")
    parser.add_argument("--vocab", type=_vocab, default=4096, help="actions per state (>= 2)")
    parser.add_argument(
        "--steps", type=positive_int, default=8, help="off-policy steps on one batch"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=0.05, help="Adam learning rate on logits"
    )
    parser.add_argument("--seed", type=seed_type, default=0, help="seed of the toy batch")
    args = parser.parse_args(argv)
    if args.batch * args.vocab > MAX_LOGITS:  # a typo must not try to allocate terabytes
        fail(
            parser.prog,
            f"--batch {args.batch} x --vocab {args.vocab} = {args.batch * args.vocab} logits, "
            f"more than the demo's {MAX_LOGITS} (64 MB a tensor)",
        )
    kw = {
        "batch": args.batch,
        "vocab": args.vocab,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
    }
    runs = {
        "PPO": run(LossConfig.ppo(), **kw),
        "PPO+ERC(0.95,1.05)": run(LossConfig.ppo(erc=ERCConfig(0.95, 1.05)), **kw),
    }
    print(
        f"Toy batch: {args.batch} states x {args.vocab} actions, {args.steps} off-policy "
        f"steps on one batch (step 1 is on-policy)."
    )
    cols = {
        "loss": "loss",
        "grad_norm": "grad norm",
        "clip_fraction": "PPO clip",
        "erc_clip_fraction": "ERC clip",
        "entropy_ratio_min": "rho min",
        "entropy_ratio_max": "rho max",
        "erc_clipped_entropy_old_mean": "H_old clipped",
        "erc_kept_entropy_old_mean": "H_old kept",
    }
    for name, hist in runs.items():
        print(f"\n{name}")
        print("step " + " ".join(f"{c:>13}" for c in cols.values()))
        for i, m in enumerate(hist, 1):
            print(f"{i:>4} " + " ".join(f"{m[c]:>13.4f}" for c in cols))
    ppo_end, erc_end = runs["PPO"][-1], runs["PPO+ERC(0.95,1.05)"][-1]
    print(
        f"\nAfter {args.steps} steps the per-state entropy ratio spans "
        f"[{ppo_end['entropy_ratio_min']:.3f}, {ppo_end['entropy_ratio_max']:.3f}] with PPO and "
        f"[{erc_end['entropy_ratio_min']:.3f}, {erc_end['entropy_ratio_max']:.3f}] with ERC."
    )
    print(
        "ERC stops the gradient of every state outside its band; once all states with a "
        "non-zero\nadvantage are outside, the gradient is 0 and what still moves the policy is "
        "Adam's momentum."
    )


if __name__ == "__main__":
    main()
