"""Classic discrete control with SB3 PPO and ERCPPO: sample efficiency and the ERC band study.

Runs a grid of variants x seeds with the zoo presets of ``erc_gym.sb3.presets``, in parallel
worker processes (one torch thread each), and writes one folder per run::

    runs/<experiment>/<env>/<variant>/<seed>/config.json     # the run's settings
    runs/<experiment>/<env>/<variant>/<seed>/metrics.jsonl   # one line per SB3 log dump

Finished runs (a ``done`` marker) are skipped when the command is repeated. At the end a summary
table is printed (and written to ``runs/<experiment>/<env>/summary.md``): final evaluation return
per variant (mean over seeds and each seed), the first evaluation step at which the mean over seeds
reached the preset's threshold, and the mean ERC / PPO clip fractions over training.

Usage::

    # issue acceptance: PPO vs ERCPPO(0.95, 1.05), 5 seeds, zoo budget
    python experiments/sb3_classic.py --env CartPole-v1 --variants ppo erc-0.95 --seeds 5
    # band study
    python experiments/sb3_classic.py --env CartPole-v1 --variants ppo erc-0.8 erc-0.9 erc-0.95
    python experiments/sb3_classic.py --env Acrobot-v1 --steps 200000 --seeds 2   # quicker look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "ppo": {"algo": "PPO"},
    "ercppo-off": {"algo": "ERCPPO", "erc_low": None, "erc_high": None},
    "erc-0.8": {"algo": "ERCPPO", "erc_low": 0.8, "erc_high": 1.2},
    "erc-0.9": {"algo": "ERCPPO", "erc_low": 0.9, "erc_high": 1.1},
    "erc-0.95": {"algo": "ERCPPO", "erc_low": 0.95, "erc_high": 1.05},
    "erc-0.99": {"algo": "ERCPPO", "erc_low": 0.99, "erc_high": 1.01},
}


@dataclass(frozen=True)
class RunConfig:
    """One training run."""

    experiment: str
    env_id: str
    variant: str
    seed: int
    total_timesteps: int
    eval_every: int
    eval_episodes: int

    def folder(self, root: Path) -> Path:
        return root / self.experiment / self.env_id / self.variant / str(self.seed)


def run_one(config: RunConfig, root: str) -> str:
    """Train one model and write its folder; returns the folder path. Runs in a worker."""
    import torch

    torch.set_num_threads(1)
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import EvalCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import JSONOutputFormat, Logger
    from stable_baselines3.common.vec_env import VecNormalize

    from erc_gym.sb3 import ERCPPO
    from erc_gym.sb3.presets import make_env_kwargs, ppo_kwargs

    out = config.folder(Path(root))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    variant = dict(VARIANTS[config.variant])
    algo = variant.pop("algo")
    env_kw = make_env_kwargs(config.env_id)
    env = make_vec_env(config.env_id, n_envs=env_kw["n_envs"], seed=config.seed)
    eval_env = make_vec_env(config.env_id, n_envs=1, seed=config.seed + 10_000)
    if env_kw["normalize"]:
        env = VecNormalize(env, gamma=ppo_kwargs(config.env_id).get("gamma", 0.99))
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False)
    kwargs = ppo_kwargs(config.env_id, seed=config.seed, device="cpu", verbose=0)
    cls = PPO if algo == "PPO" else ERCPPO
    model = cls("MlpPolicy", env, **kwargs, **variant)
    model.set_logger(Logger(str(out), [JSONOutputFormat(str(out / "metrics.jsonl"))]))
    (out / "config.json").write_text(
        json.dumps({**asdict(config), "algo": algo, **variant, "preset": config.env_id}, indent=2)
    )
    eval_cb = EvalCallback(
        eval_env,
        eval_freq=max(config.eval_every // env_kw["n_envs"], 1),
        n_eval_episodes=config.eval_episodes,
        deterministic=True,
        verbose=0,
    )
    t0 = time.perf_counter()
    model.learn(config.total_timesteps, callback=eval_cb, log_interval=1)
    # a final evaluation at the end of the budget, on the same footing as the periodic ones
    eval_cb.eval_freq = 1
    eval_cb.n_calls = 0
    eval_cb.on_step()
    model.logger.dump(model.num_timesteps)
    (out / "done").write_text(f"{time.perf_counter() - t0:.1f}\n")
    env.close()
    eval_env.close()
    return str(out)


def _read(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(root: Path, experiment: str, env_id: str, variants: list[str]) -> str:
    """Markdown table of the finished runs of one env."""
    from erc_gym.sb3.presets import PRESETS

    threshold = PRESETS[env_id]["reference"]["threshold"]
    lines = [
        f"### {env_id} (threshold {threshold})",
        "",
        "| variant | seeds | final eval return, mean | per seed | first step mean >= "
        "threshold | ERC clip fraction | PPO clip fraction (two-sided) | train entropy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        vdir = root / experiment / env_id / variant
        seeds = sorted(p for p in vdir.glob("*") if (p / "done").exists()) if vdir.exists() else []
        if not seeds:
            continue
        curves: list[dict[int, float]] = []
        finals, erc_fracs, clip_fracs, entropies = [], [], [], []
        for sd in seeds:
            rows = _read(sd)
            evals = {
                int(r["time/total_timesteps"]): r["eval/mean_reward"]
                for r in rows
                if "eval/mean_reward" in r
            }
            curves.append(evals)
            finals.append(evals[max(evals)])
            erc = [r["train/erc_clip_fraction"] for r in rows if "train/erc_clip_fraction" in r]
            clip = [r["train/clip_fraction"] for r in rows if "train/clip_fraction" in r]
            ent = [-r["train/entropy_loss"] for r in rows if "train/entropy_loss" in r]
            erc_fracs.append(statistics.mean(erc) if erc else math.nan)
            clip_fracs.append(statistics.mean(clip) if clip else math.nan)
            entropies.append(statistics.mean(ent) if ent else math.nan)
        common = sorted(set.intersection(*(set(c) for c in curves)))
        first = next(
            (s for s in common if statistics.mean(c[s] for c in curves) >= threshold), None
        )
        lines.append(
            f"| {variant} | {len(seeds)} | {statistics.mean(finals):.1f} | "
            f"{', '.join(f'{f:.0f}' for f in finals)} | "
            f"{first if first is not None else 'not reached'} | "
            f"{statistics.mean(erc_fracs):.3f} | {statistics.mean(clip_fracs):.3f} | "
            f"{statistics.mean(entropies):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from erc_gym.sb3.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="CartPole-v1", choices=sorted(PRESETS))
    parser.add_argument(
        "--variants", nargs="+", default=["ppo", "erc-0.95"], choices=sorted(VARIANTS)
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's budget")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="env steps between evaluations (default: budget / 10)",
    )
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--experiment", default="sb3_classic")
    parser.add_argument("--root", default="runs")
    args = parser.parse_args()

    steps = args.steps or PRESETS[args.env]["n_timesteps"]
    eval_every = args.eval_every or max(steps // 10, 1)
    root = Path(args.root)
    configs = [
        RunConfig(args.experiment, args.env, v, s, steps, eval_every, args.eval_episodes)
        for v in args.variants
        for s in range(args.seeds)
    ]
    todo = [c for c in configs if not (c.folder(root) / "done").exists()]
    print(
        f"{len(configs)} runs, {len(configs) - len(todo)} already done, {len(todo)} to run "
        f"on {args.workers} workers",
        flush=True,
    )
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_one, c, str(root)): c for c in todo}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="runs"):
            fut.result()
    table = summarize(root, args.experiment, args.env, args.variants)
    (root / args.experiment / args.env).mkdir(parents=True, exist_ok=True)
    (root / args.experiment / args.env / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
