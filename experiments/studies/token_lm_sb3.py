"""Benchmark: ERCPPO + TokenLMPolicy (a tiny random transformers LM) on TokenSequence-v0.

The task: read a one-symbol prompt and write it back, then EOS (``vocab_size`` 6: padding, EOS
and 4 symbols). A uniformly random policy scores about 0.1; writing the right symbol without EOS
scores 0.5; the full answer scores 1.0. Prints the mean return before and after training, the
uniform-random baseline and the wall time.

Usage::

    python experiments/studies/token_lm_sb3.py            # 12k env steps, about a minute on 2 cores
    python experiments/studies/token_lm_sb3.py --steps 4000 --no-erc
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from erc_gym.cli_args import CliParser, non_negative_int, positive_int
from erc_gym.sb3 import ERCPPO

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 16,
}


def random_return(env_kwargs: dict[str, Any], episodes: int, seed: int) -> float:
    """Mean return of the uniform random policy."""
    env = make_vec_env("erc_gym/TokenSequence-v0", n_envs=1, seed=seed, env_kwargs=env_kwargs)
    env.action_space.seed(seed)
    total, done_eps = 0.0, 0
    env.reset()
    while done_eps < episodes:
        _, reward, done, _ = env.step(np.array([env.action_space.sample()]))
        if done[0]:
            total += float(reward[0])
            done_eps += 1
    return total / episodes


def train(steps: int, seed: int, erc: bool, episodes: int = 200) -> dict[str, float]:
    """Train and evaluate; returns before/after/random returns and seconds."""
    env_kwargs = {"vocab_size": 6, "prompt_length": 1}
    env = make_vec_env("erc_gym/TokenSequence-v0", n_envs=8, seed=seed, env_kwargs=env_kwargs)
    band = {"erc_low": 0.8, "erc_high": 1.2} if erc else {"erc_low": None, "erc_high": None}
    model = ERCPPO(
        "TokenLMPolicy",
        env,
        policy_kwargs={"lm_config": {**TINY_LLAMA, "vocab_size": 6}},
        n_steps=64,
        batch_size=128,
        n_epochs=4,
        learning_rate=1e-3,
        seed=seed,
        device="cpu",
        **band,
    )
    eval_env = make_vec_env(
        "erc_gym/TokenSequence-v0", n_envs=1, seed=seed + 1, env_kwargs=env_kwargs
    )
    before, _ = evaluate_policy(model, eval_env, n_eval_episodes=episodes, deterministic=False)
    t0 = time.perf_counter()
    model.learn(steps)
    seconds = time.perf_counter() - t0
    after, _ = evaluate_policy(model, eval_env, n_eval_episodes=episodes, deterministic=False)
    return {
        "before": float(np.mean(before)),
        "after": float(np.mean(after)),
        "random": random_return(env_kwargs, episodes, seed),
        "seconds": seconds,
        "params": float(sum(p.numel() for p in model.policy.parameters())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=12_000)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--no-erc", action="store_true", help="train without ERC")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = train(args.steps, args.seed, erc=not args.no_erc)
    print(
        f"ERCPPO({'no ERC' if args.no_erc else 'ERC 0.8/1.2'}) + TokenLMPolicy "
        f"({int(res['params'])} parameters), TokenSequence-v0 V=6, {args.steps} steps: "
        f"return {res['before']:.3f} -> {res['after']:.3f} (uniform random "
        f"{res['random']:.3f}) in {res['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
