"""A one-minute look at what ERC does: PPO-clip vs PPO-clip + ERC, printed step by step.

Three parts, all on softmax policies with free logits (a "tabular" policy, as the last layer of
an LLM would be):

1. **One state, five actions** (:func:`worked_example`): one sampled action with a positive
   advantage, several SGD steps on that one sample. The sampled action's probability ratio stays
   inside PPO's clip while the entropy ratio leaves ERC's band and the un-sampled actions lose
   probability mass they were never sampled for.
2. **What the entropy ratio cannot see** (:func:`blind_spots`): a swap of the top two actions at
   equal entropy (ratio exactly 1) and a tiny absolute change at low entropy (a large ratio).
3. **A batch** (:func:`run`): ``B`` states with ``V`` actions, some near-deterministic, one batch
   of sampled actions reused for several off-policy Adam steps -- the regime in which ERC acts --
   with the loss, the gradient norm, the clip fractions and how far the entropy moved per step.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from erc_gym.cli_args import CliParser, fail, positive_float, positive_int
from erc_gym.cli_args import seed as seed_type
from erc_gym.diagnostics import unsampled_drift
from erc_gym.entropy import entropy_from_logits, logprob_and_entropy
from erc_gym.losses import ERCConfig, LossConfig, clip_flags, entropy_ratio, policy_loss

__all__ = [
    "WORKED_LOGITS",
    "BlindSpot",
    "WorkedStep",
    "blind_spots",
    "run",
    "toy_batch",
    "worked_example",
]

#: Old-policy logits of the worked example: probabilities about 0.50, 0.20, 0.15, 0.10, 0.05.
WORKED_LOGITS = (2.0, 1.1, 0.8, 0.4, -0.3)

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


@dataclass
class WorkedStep:
    """One optimiser step of :func:`worked_example`.

    Attributes:
        step: 1-based step number (step 1 is on-policy: both ratios are 1 when it is taken).
        ratio_seen: the sampled action's ``p_new / p_old`` that the loss saw *before* this step.
        entropy_ratio_seen: ``H_new / H_old`` that the loss saw before this step.
        clip_active: a clip bound of the loss was active (for PPO-clip: the sample gave this step
            no gradient; GPPO still passes one).
        erc_kept: ERC kept the state's gradient (True when ERC is off).
        logits_change: change of each logit made by this step (``z_after - z_before``).
        probs: action probabilities after the step.
        ratio: the sampled action's ``p / p_old`` after the step.
        entropy: entropy after the step (nats).
        entropy_ratio: ``H / H_old`` after the step.
        tv_unsampled: ``0.5 * sum |p - p_old|`` over the actions that were not sampled.
    """

    step: int
    ratio_seen: float
    entropy_ratio_seen: float
    clip_active: bool
    erc_kept: bool
    logits_change: list[float]
    probs: list[float]
    ratio: float
    entropy: float
    entropy_ratio: float
    tv_unsampled: float


def worked_example(
    config: LossConfig,
    *,
    lr: float = 0.3,
    steps: int = 4,
    logits: Sequence[float] = WORKED_LOGITS,
    sampled: int = 0,
    advantage: float = 1.0,
) -> list[WorkedStep]:
    """One state, one sampled action, ``steps`` plain SGD steps on the logits with ``config``.

    Plain SGD (no momentum) keeps the arithmetic visible: a step whose gradient the loss stops
    leaves the logits exactly where they are. The gradient of ``log p(a)`` with respect to the
    logit of action ``b`` is ``1[a = b] - p(b)``, so one step on the sampled action ``a`` changes
    every logit: ``dz_b = lr * A * r * (1[a = b] - p(b))``.

    Args:
        config: the loss, e.g. ``LossConfig.ppo()`` or
            ``LossConfig.ppo(erc=ERCConfig(0.95, 1.05))``.
        lr: SGD learning rate on the logits.
        steps: optimiser steps on the one sample (the first is on-policy).
        logits: the old policy's logits (at least 2).
        sampled: index of the sampled action.
        advantage: its advantage.

    Returns:
        One :class:`WorkedStep` per step.
    """
    if len(logits) < 2:
        raise ValueError(f"logits needs at least 2 actions, got {len(logits)}")
    if not 0 <= sampled < len(logits):
        raise ValueError(f"sampled must be in [0, {len(logits) - 1}], got {sampled}")
    old = torch.tensor([list(logits)], dtype=torch.float64)
    action = torch.tensor([sampled])
    adv = torch.tensor([float(advantage)], dtype=torch.float64)
    old_lp, old_h = logprob_and_entropy(old, action)
    old_p = torch.softmax(old, -1)
    sampled_mask = torch.zeros_like(old, dtype=torch.bool)
    sampled_mask[0, sampled] = True
    z = old.clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=lr)
    out = []
    for k in range(1, steps + 1):
        before = z.detach().clone()
        lp, h = logprob_and_entropy(z, action)
        loss = policy_loss(lp, old_lp, adv, entropy=h, old_entropy=old_h, config=config)
        ratio_seen = float(torch.exp(lp - old_lp).detach())
        flags = clip_flags(
            torch.exp(lp - old_lp).detach(),
            adv,
            eps_low=config.eps_low,
            eps_high=config.eps_high,
            dual_clip_c=config.dual_clip_c,
        )
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
        with torch.no_grad():
            p = torch.softmax(z, -1)
            h_new = entropy_from_logits(z)
            out.append(
                WorkedStep(
                    step=k,
                    ratio_seen=ratio_seen,
                    entropy_ratio_seen=float(entropy_ratio(h, old_h)),
                    clip_active=any(bool(f.any()) for f in flags.values()),
                    erc_kept=True if loss.erc_keep is None else bool(loss.erc_keep.all()),
                    logits_change=(z - before)[0].tolist(),
                    probs=p[0].tolist(),
                    ratio=float(p[0, sampled] / old_p[0, sampled]),
                    entropy=float(h_new),
                    entropy_ratio=float(entropy_ratio(h_new, old_h)),
                    tv_unsampled=unsampled_drift(old_p, p, sampled_mask),
                )
            )
    return out


@dataclass
class BlindSpot:
    """A change of one state's distribution, with what the entropy ratio makes of it.

    Attributes:
        name: what the case shows.
        old_probs: probabilities before.
        new_probs: probabilities after.
        entropy_old: entropy before (nats).
        entropy_new: entropy after (nats).
        entropy_ratio: ``H_new / H_old`` as ERC computes it.
        tv: total variation ``0.5 * sum |p_new - p_old|`` over all actions.
    """

    name: str
    old_probs: list[float]
    new_probs: list[float]
    entropy_old: float
    entropy_new: float
    entropy_ratio: float
    tv: float


def blind_spots() -> list[BlindSpot]:
    """Two changes the entropy ratio misjudges, on five actions.

    * ``top-two swap``: the two most likely actions trade places. The entropy is a symmetric
      function of the probabilities, so the ratio is exactly 1 (ERC keeps the state) although
      30% of the mass moved; an action outside the swap has probability ratio 1 too.
    * ``low entropy``: a near-deterministic state whose top action loses 0.1% of its mass. The
      total variation is 0.001, but the entropy nearly doubles: far outside any band.
    """
    cases = [
        ("top-two swap", [0.6, 0.3, 0.05, 0.03, 0.02], [0.3, 0.6, 0.05, 0.03, 0.02]),
        ("low entropy", [0.999] + [0.00025] * 4, [0.998] + [0.0005] * 4),
    ]
    out = []
    for name, before, after in cases:
        old_p = torch.tensor([before], dtype=torch.float64)
        new_p = torch.tensor([after], dtype=torch.float64)
        h_old = entropy_from_logits(old_p.log())
        h_new = entropy_from_logits(new_p.log())
        out.append(
            BlindSpot(
                name=name,
                old_probs=before,
                new_probs=after,
                entropy_old=float(h_old),
                entropy_new=float(h_new),
                entropy_ratio=float(entropy_ratio(h_new, h_old)),
                tv=float(0.5 * (new_p - old_p).abs().sum()),
            )
        )
    return out


def _fmt_probs(probs: Sequence[float], spec: str = ".3f") -> str:
    return "[" + ", ".join(format(x, spec) for x in probs) + "]"


def print_worked_example(lr: float = 0.3, steps: int = 4) -> None:
    """Print part 1 (:func:`worked_example`, PPO-clip with and without ERC) and part 2."""
    old_p = torch.softmax(torch.tensor(WORKED_LOGITS, dtype=torch.float64), -1)
    old_h = float(entropy_from_logits(torch.tensor([WORKED_LOGITS], dtype=torch.float64)))
    print("1. One state, five actions")
    print(f"old policy p_old = {_fmt_probs(old_p.tolist())}, H_old = {old_h:.3f} nats")
    print(
        f"action 0 was sampled with advantage +1; {steps} plain SGD steps (lr {lr}) on the "
        "logits of\nthis one sample (step 1 is on-policy). 'seen' = what the loss saw before "
        "the step;\nr = p(0) / p_old(0); rho = H / H_old; TV = mass moved on the un-sampled "
        "actions 1-4."
    )
    configs = {
        "PPO-clip (eps 0.2)": LossConfig.ppo(),
        "PPO-clip + ERC(0.95, 1.05)": LossConfig.ppo(erc=ERCConfig(0.95, 1.05)),
    }
    results = {name: worked_example(c, lr=lr, steps=steps) for name, c in configs.items()}
    for name, rows in results.items():
        print(f"\n{name}")
        print(
            "step  r seen  rho seen  PPO clip  ERC   | p after                              r  "
            "   rho     TV"
        )
        for w in rows:
            erc = "keep" if w.erc_kept else "MASK"
            if name.startswith("PPO-clip (") and w.erc_kept:
                erc = "-"
            print(
                f"{w.step:>4} {w.ratio_seen:>7.3f} {w.entropy_ratio_seen:>9.3f} "
                f"{'active' if w.clip_active else '-':>9} {erc:>5} | {_fmt_probs(w.probs)} "
                f"{w.ratio:>6.3f} {w.entropy_ratio:>6.3f} {w.tv_unsampled:>6.3f}"
            )
    first = results["PPO-clip (eps 0.2)"][0]
    dz = torch.tensor(first.logits_change, dtype=torch.float64)
    log_p = old_p.log()
    cov = float((old_p * (log_p - (old_p * log_p).sum()) * (dz - (old_p * dz).sum())).sum())
    changes = ", ".join(f"{x:+.3f}" for x in first.logits_change)
    print(f"\nStep 1 changed every logit, dz = lr * A * r * (1[b = 0] - p_old(b))\n= [{changes}]:")
    print(
        "the un-sampled actions lost mass only because action 0 gained it. First-order entropy "
        f"change\n-Cov_p(log p, dz) = {-cov:+.4f} nats; measured {first.entropy - old_h:+.4f}."
    )
    print("\n2. What the entropy ratio cannot see")
    for b in blind_spots():
        print(
            f"{b.name:<13} {_fmt_probs(b.old_probs, '.4g')} -> {_fmt_probs(b.new_probs, '.4g')}: H "
            f"{b.entropy_old:.4f} -> {b.entropy_new:.4f}, rho = {b.entropy_ratio:.3f}, "
            f"TV = {b.tv:.3f}"
        )


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
    print_worked_example()
    print(
        f"\n3. A batch: {args.batch} states x {args.vocab} actions (half near-deterministic), "
        f"{args.steps} Adam steps (lr {args.lr}) on one batch of sampled actions (step 1 is "
        "on-policy)."
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
        "ERC stops the gradient of every state outside its band, PPO-clip that of every sample "
        "whose\nclip is active; once each sample is stopped by one or the other, the gradient "
        "is 0 and what\nstill moves the policy is Adam's momentum."
    )


if __name__ == "__main__":
    main()
