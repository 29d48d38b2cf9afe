"""Benchmark: ERCPPO steps per second against SB3 PPO with identical settings.

Zoo CartPole-v1 settings (``erc_gym.sb3.presets``), DummyVecEnv, CPU. PPO, ERCPPO with ERC on
(0.95, 1.05) and ERCPPO with ERC off are run in alternation, ``--repeats`` times each, so noise
from the shared machine hits all of them; the median steps per second and the ratios are printed.

Usage::

    python experiments/bench/bench_sb3_speed.py                      # 100k steps, 3 repeats
    python experiments/bench/bench_sb3_speed.py --steps 20000 --repeats 2
    python experiments/bench/bench_sb3_speed.py --repeats 5 --threads 1   # steadier on a shared VM
    python experiments/bench/bench_sb3_speed.py --update-only 200          # the update alone
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from erc_gym.cli_args import CliParser, non_negative_int, positive_int
from erc_gym.sb3 import ERCPPO
from erc_gym.sb3.presets import make_env_kwargs, ppo_kwargs

VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "PPO": (PPO, {}),
    "ERCPPO (ERC 0.95/1.05)": (ERCPPO, {"erc_low": 0.95, "erc_high": 1.05}),
    "ERCPPO (ERC off)": (ERCPPO, {"erc_low": None, "erc_high": None}),
}


def update_only(env_id: str, repeats: int) -> None:
    """Median time of one ``train()`` (the update alone), variants alternated call by call."""
    n_envs = make_env_kwargs(env_id)["n_envs"]
    models = {}
    for name, (cls, extra) in VARIANTS.items():
        kwargs = ppo_kwargs(env_id, seed=0, device="cpu")
        kwargs.pop("policy", None)
        model = cls("MlpPolicy", make_vec_env(env_id, n_envs=n_envs, seed=0), **kwargs, **extra)
        model.learn(model.n_steps * n_envs)  # fills the rollout buffer (and sets up the logger)
        models[name] = model
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.train()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["PPO"])
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {env_id}, train() only, "
        f"{repeats} alternated calls per variant"
    )
    print(f"{'variant':<24} {'median ms/update':>17} {'ratio to PPO':>13}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<24} {1000 * med:>17.2f} {med / base:>12.3f}x")


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--steps", type=positive_int, default=100_000)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument(
        "--update-only",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="instead: time N alternated train() calls on one collected rollout per variant",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.update_only:
        update_only(args.env, args.update_only)
        return
    sps: dict[str, list[float]] = {k: [] for k in VARIANTS}
    n_envs = make_env_kwargs(args.env)["n_envs"]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.env}, "
        f"{args.steps} steps, n_envs {n_envs}, {args.repeats} alternations"
    )
    for rep in range(args.repeats):
        for name, (cls, extra) in VARIANTS.items():
            env = make_vec_env(args.env, n_envs=n_envs, seed=rep)
            kwargs = ppo_kwargs(args.env, seed=rep, device="cpu")
            kwargs.pop("policy", None)
            model = cls("MlpPolicy", env, **kwargs, **extra)
            t0 = time.perf_counter()
            model.learn(args.steps)
            sps[name].append(model.num_timesteps / (time.perf_counter() - t0))
            print(f"  repeat {rep}: {name:<24} {sps[name][-1]:8.0f} steps/s", flush=True)
    base = statistics.median(sps["PPO"])
    print(f"\n{'variant':<24} {'median steps/s':>15} {'ratio to PPO':>13}")
    for name, values in sps.items():
        med = statistics.median(values)
        print(f"{name:<24} {med:>15.0f} {med / base:>12.3f}x")
    print("\nper-alternation ratios to the PPO run just before (noise check):")
    for name, values in list(sps.items())[1:]:
        pairs = [v / p for v, p in zip(values, sps["PPO"], strict=True)]
        print(
            f"{name:<24} "
            + " ".join(f"{r:.3f}" for r in pairs)
            + f"  (median {statistics.median(pairs):.3f})"
        )


if __name__ == "__main__":
    main()
