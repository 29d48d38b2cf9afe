"""Classic discrete control with SB3 PPO and ERCPPO: sample efficiency and the ERC band study.

A thin front end to :mod:`erc_gym.lab.runner` (kind ``sb3``: ERCPPO with the zoo presets of
``erc_gym.sb3.presets``; ERC off is ERCPPO with ``erc_low=erc_high=None``, which holds SB3 PPO's
exact parameters). Runs in parallel worker processes and writes one folder per run::

    runs/<experiment>/<env>-ppo[-erc<low>-<high>]/<seed>/{config.json,metrics.jsonl}

Finished runs are skipped and unfinished ones resumed when the command is repeated. At the end a
summary table is printed (and written to ``runs/<experiment>/summary_<env>.md``): final
evaluation return per variant (mean over seeds and each seed), the first evaluation step at which
the mean over seeds reached the preset's threshold, and the mean ERC / PPO clip fractions.

Usage::

    # PPO vs ERCPPO(0.95, 1.05), 5 seeds, zoo budget
    python experiments/studies/sb3_classic.py --env CartPole-v1 --variants ppo erc-0.95 --seeds 5
    # band study
    python experiments/studies/sb3_classic.py --env CartPole-v1 \\
        --variants ppo erc-0.8 erc-0.9 erc-0.95
    # quicker look
    python experiments/studies/sb3_classic.py --env Acrobot-v1 --steps 200000 --seeds 2
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from erc_gym.cli_args import CliParser, positive_int
from erc_gym.lab.analysis import load_runs
from erc_gym.lab.runner import run_experiment

#: Variant name -> ERC band (None: ERC off).
VARIANTS: dict[str, tuple[float, float] | None] = {
    "ppo": None,
    "erc-0.8": (0.8, 1.2),
    "erc-0.9": (0.9, 1.1),
    "erc-0.95": (0.95, 1.05),
    "erc-0.99": (0.99, 1.01),
}


def experiment_spec(
    experiment: str,
    env_id: str,
    variants: list[str],
    seeds: int,
    steps: int,
    eval_every: int,
    eval_episodes: int,
) -> dict[str, Any]:
    """The runner config of one environment's grid."""
    return {
        "name": experiment,
        "kind": "sb3",
        "seeds": seeds,
        "algorithms": ["ppo"],
        "erc": [VARIANTS[v] for v in variants],
        "envs": [{"label": env_id, "id": env_id}],
        "settings": {"steps": steps, "eval_every": eval_every, "eval_episodes": eval_episodes},
    }


def summarize(root: Path, experiment: str, env_id: str) -> str:
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
    groups: dict[str, list[Any]] = {}
    for run in load_runs(root / experiment):
        if run.done and run.env_label == env_id:
            groups.setdefault(run.variant, []).append(run)

    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return statistics.mean(finite) if finite else math.nan

    for variant, runs in groups.items():
        curves = [dict(zip(*r.series("score"), strict=True)) for r in runs]
        finals = [r.final_score() for r in runs]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        first = next(
            (s for s in common if statistics.mean(c[s] for c in curves) >= threshold), None
        )
        erc = mean([mean(list(r.series("erc_clip_fraction")[1])) for r in runs])
        clip = mean([mean(list(r.series("clip_fraction")[1])) for r in runs])
        ent = mean([mean(list(r.series("entropy")[1])) for r in runs])
        lines.append(
            f"| {variant} | {len(runs)} | {statistics.mean(finals):.1f} | "
            f"{', '.join(f'{f:.0f}' for f in finals)} | "
            f"{int(first) if first is not None else 'not reached'} | "
            f"{erc:.3f} | {clip:.3f} | {ent:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from erc_gym.sb3.presets import PRESETS

    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="CartPole-v1", choices=sorted(PRESETS))
    parser.add_argument(
        "--variants", nargs="+", default=["ppo", "erc-0.95"], choices=sorted(VARIANTS)
    )
    parser.add_argument("--seeds", type=positive_int, default=5, help="seeds 0 .. N-1")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="default: the preset's budget"
    )
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        default=None,
        help="env steps between evaluations (default: budget / 10)",
    )
    parser.add_argument("--eval-episodes", type=positive_int, default=20)
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--experiment", default="sb3_classic")
    parser.add_argument("--root", default="runs")
    args = parser.parse_args(argv)

    steps = args.steps or PRESETS[args.env]["n_timesteps"]
    eval_every = args.eval_every or max(steps // 10, 1)
    spec = experiment_spec(
        args.experiment,
        args.env,
        args.variants,
        args.seeds,
        steps,
        eval_every,
        args.eval_episodes,
    )
    root = Path(args.root)
    run_experiment(spec, root, workers=args.workers)
    table = summarize(root, args.experiment, args.env)
    (root / args.experiment / f"summary_{args.env}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
