"""Benchmark: ERCPPO steps per second against SB3 PPO with identical settings.

Zoo CartPole-v1 settings (``erc_gym.sb3.presets``), DummyVecEnv, CPU. PPO, ERCPPO with ERC on
(0.95, 1.05) and ERCPPO with ERC off are run in alternation, ``--repeats`` times each, so noise
from the shared machine hits all of them; the median steps per second and the ratios are printed.

Usage::

    python experiments/bench_sb3_speed.py                      # 100k steps, 3 repeats
    python experiments/bench_sb3_speed.py --steps 20000 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from erc_gym.sb3 import ERCPPO
from erc_gym.sb3.presets import make_env_kwargs, ppo_kwargs

VARIANTS = {
    "PPO": (PPO, {}),
    "ERCPPO (ERC 0.95/1.05)": (ERCPPO, {"erc_low": 0.95, "erc_high": 1.05}),
    "ERCPPO (ERC off)": (ERCPPO, {"erc_low": None, "erc_high": None}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
