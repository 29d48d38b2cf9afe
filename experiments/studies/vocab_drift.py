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

    python experiments/studies/vocab_drift.py                  # V in {16, 256, 4096}, 3 seeds
    python experiments/studies/vocab_drift.py --vocab 4096 --iterations 5
"""

from __future__ import annotations

import statistics

import numpy as np

from erc_gym.bandit import BanditConfig, train_bandit
from erc_gym.cli_args import CliParser, fail, positive_float, positive_int


def run(
    vocab: int,
    erc: tuple[float, float] | None,
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
    """One PPO-clip run (ERC band or None); the per-batch statistics averaged over iterations."""
    config = BanditConfig(
        vocab_size=vocab,
        num_contexts=contexts,
        sharp_fraction=sharp_fraction,
        policy=policy,
        iterations=iterations,
        group=group,
        minibatches=minibatches,
        lr=lr,
        loss="ppo",
        erc_low=None if erc is None else erc[0],
        erc_high=None if erc is None else erc[1],
        seed=seed,
    )
    rows = train_bandit(config)[1:]  # the first line is the untrained prior
    keys = {
        "tv_unsampled": "tv_unsampled",
        "abs_dH": "abs_entropy_change",
        "max_abs_log_h_ratio": "max_abs_log_entropy_ratio",
        "reward": "reward",
        "sampled_outside_clip": "sampled_outside_clip",
        "erc_clip_fraction": "erc_clip_fraction",
    }
    out = {k: statistics.mean(r[src] for r in rows) for k, src in keys.items()}
    out["ratio_min"] = min(r["sampled_ratio_min"] for r in rows)
    out["ratio_max"] = max(r["sampled_ratio_max"] for r in rows)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=positive_int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--iterations", type=positive_int, default=10, help="batches per run")
    parser.add_argument(
        "--group", type=positive_int, default=16, help="samples per context and batch"
    )
    parser.add_argument(
        "--minibatches", type=positive_int, default=8, help="off-policy steps per batch"
    )
    parser.add_argument("--contexts", type=positive_int, default=16)
    parser.add_argument(
        "--lr", type=positive_float, default=0.05, help="Adam learning rate on logits"
    )
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
    args = parser.parse_args(argv)
    for vocab in args.vocab:  # every bad value as one line now, not a traceback mid-table
        try:
            BanditConfig(
                vocab_size=vocab,
                num_contexts=args.contexts,
                sharp_fraction=args.sharp_fraction,
                group=args.group,
                lr=args.lr,
            ).validate()
        except ValueError as err:
            fail(parser.prog, str(err))
    variants: dict[str, tuple[float, float] | None] = {
        "PPO-clip": None,
        "PPO-clip + ERC(0.95,1.05)": (0.95, 1.05),
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
