"""The ``erc-gym`` command line: one entry point, one subcommand per job.

``erc-gym train``       an SB3 algorithm (ERCPPO, PPO, A2C) on any Gymnasium id
``erc-gym llm``         a causal LM with GRPO / DAPO / GPPO (+ERC)
``erc-gym experiment``  a shipped or custom experiment grid (runs in parallel, resumable)
``erc-gym plot``        figures of a runs folder
``erc-gym report``      Markdown + HTML report of a runs folder (with the figures)
``erc-gym demo``        PPO vs PPO+ERC on one toy batch, printed step by step
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

COMMANDS = {
    "train": ("erc_gym.cli:train_main", "train an SB3 algorithm (ERCPPO/PPO/A2C) on a Gym id"),
    "llm": ("erc_gym.llm.cli:main", "train a causal LM with GRPO/DAPO/GPPO (+ERC)"),
    "experiment": ("erc_gym.cli:experiment_main", "run an experiment grid (resumable)"),
    "plot": ("erc_gym.cli:plot_main", "figures of a runs folder"),
    "report": ("erc_gym.cli:report_main", "Markdown/HTML report of a runs folder"),
    "demo": ("erc_gym.demo:main", "PPO vs PPO+ERC on a toy batch: loss, gradients, entropy"),
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``erc-gym <command> ...`` to the command's own argument parser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="erc-gym",
        description="Entropy Ratio Clipping (ERC) testbed.",
        epilog="Run 'erc-gym <command> --help' for the options of a command.",
    )
    parser.add_argument(
        "command",
        choices=list(COMMANDS),
        help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()),
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0 if argv else 2)
    args = parser.parse_args(argv[:1])
    module, func = COMMANDS[args.command][0].split(":")
    getattr(importlib.import_module(module), func)(argv[1:])


def _experiment_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is an experiment folder, else its sub-folders that are."""
    from erc_gym.analysis import find_experiments

    try:
        found, notes = find_experiments(path)
    except FileNotFoundError:
        raise SystemExit(f"error: no folder {path}") from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not found:
        raise SystemExit(f"error: no runs below {path} (expected <variant>/<seed>/config.json)")
    return found


def experiment_main(argv: list[str] | None = None) -> None:
    """``erc-gym experiment NAME``: run a grid, then write its report."""
    import shlex
    import signal

    from erc_gym.runner import list_experiments

    argv = list(sys.argv[1:] if argv is None else argv)
    shipped = list_experiments()
    parser = argparse.ArgumentParser(
        prog="erc-gym experiment",
        description="Run an experiment grid (algorithm x ERC band x env x seed) in parallel "
        "processes; finished runs are skipped, unfinished ones resumed. Writes "
        "RUNS/<experiment>/<variant>/<seed>/{config.json,run.json,metrics.jsonl} and a report. "
        "Ctrl-C stops every run at its last checkpoint; the same command resumes.",
        epilog=f"Shipped experiments: {', '.join(shipped)} (--list describes them).",
    )
    parser.add_argument("name", nargs="?", help="a shipped experiment name or a JSON config file")
    parser.add_argument("--list", action="store_true", help="list the shipped experiments")
    parser.add_argument("--runs", default="runs", help="runs folder (default: runs)")
    parser.add_argument(
        "--workers", type=_at_least_one, default=None, help="processes (default: cores)"
    )
    parser.add_argument(
        "--seeds", type=_at_least_one, default=None, help="override the number of seeds"
    )
    parser.add_argument("--restart", action="store_true", help="restart unfinished runs")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over the runs whose folder was made with another config (deletes them)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip the report and figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.list:
        width = max(map(len, shipped), default=0)
        for name, description in shipped.items():
            print(f"{name:<{width}}  {description}")
        return
    if not args.name:
        parser.exit(2, "erc-gym experiment: error: give an experiment name (--list shows them)\n")
    from erc_gym.experiment_config import ConfigError
    from erc_gym.runner import (
        ConfigMismatch,
        ExperimentInterrupted,
        RunsFailed,
        load_experiment,
        run_experiment,
    )

    try:
        spec = load_experiment(args.name)
        run_experiment(
            spec,
            args.runs,
            workers=args.workers,
            resume=not args.restart,
            seeds=args.seeds,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ConfigError, ConfigMismatch) as err:
        parser.exit(2, f"erc-gym experiment: error: {err}\n")
    except RunsFailed as err:
        parser.exit(1, f"erc-gym experiment: error: {err}\n")
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
        parser.exit(130, "erc-gym experiment: stopped by SIGINT; the same command resumes\n")
    except ExperimentInterrupted as err:
        again = shlex.join(["erc-gym", "experiment", *argv])
        parser.exit(
            128 + err.signum,
            f"erc-gym experiment: stopped by {signal.Signals(err.signum).name}: "
            f"{err.finished}/{err.total} runs finished, {len(err.stopped)} stopped at their last "
            f"checkpoint; resume with: {again}\n",
        )
    if not args.no_report:
        from erc_gym.report import write_report

        report = write_report(Path(args.runs) / spec["name"])
        print(f"report: {report}")


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def plot_main(argv: list[str] | None = None) -> None:
    """``erc-gym plot RUNS_DIR``: PNG and SVG figures of every experiment below a folder."""
    parser = argparse.ArgumentParser(
        prog="erc-gym plot",
        description="Curves (mean over seeds, 95%% bootstrap band) and entropy-ratio heat maps, "
        "written to <experiment>/figures/ as PNG and SVG.",
    )
    parser.add_argument("runs_dir", type=Path, help="an experiment folder or a runs folder")
    args = parser.parse_args(argv)
    from erc_gym.plots import plot_experiment

    for folder in _experiment_dirs(args.runs_dir):
        for path in plot_experiment(folder):
            print(path)


def report_main(argv: list[str] | None = None) -> None:
    """``erc-gym report RUNS_DIR``: report.md and report.html of every experiment below it."""
    parser = argparse.ArgumentParser(
        prog="erc-gym report",
        description="Final-score table (IQM, 95%% bootstrap CI), entropy diagnostics and figures, "
        "written to <experiment>/report.md and report.html.",
    )
    parser.add_argument("runs_dir", type=Path, help="an experiment folder or a runs folder")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    from erc_gym.report import write_report

    for folder in _experiment_dirs(args.runs_dir):
        print(write_report(folder, plots=not args.no_plots))


def train_main(argv: list[str] | None = None) -> None:
    """``erc-gym train ENV_ID``: an SB3 algorithm with ERC options and entropy diagnostics."""
    parser = argparse.ArgumentParser(
        prog="erc-gym train",
        description="Train ERCPPO (or SB3's PPO / A2C) on a Gymnasium id with discrete actions. "
        "Zoo hyperparameters are used when erc_gym.sb3.presets has the id. Logs SB3's keys and "
        "the diagnostics/* keys of EntropyDynamicsCallback to LOG_DIR/progress.json.",
    )
    parser.add_argument("env_id", help="Gymnasium id, e.g. CartPole-v1 or erc_gym/VocabBandit-v0")
    parser.add_argument("--algo", choices=["ercppo", "ppo", "a2c"], default="ercppo")
    parser.add_argument("--steps", type=int, default=None, help="default: preset or 100000")
    parser.add_argument("--erc-low", type=float, default=0.95, help="ERCPPO band, lower bound")
    parser.add_argument("--erc-high", type=float, default=1.05, help="ERCPPO band, upper bound")
    parser.add_argument("--no-erc", action="store_true", help="ERCPPO with ERC off (= SB3 PPO)")
    parser.add_argument("--clip-range-high", type=float, default=None, help="DAPO clip-higher")
    parser.add_argument("--clip-variant", choices=["ppo", "gppo"], default="ppo")
    parser.add_argument("--dual-clip", type=float, default=None, help="dual-clip constant c > 1")
    parser.add_argument("--n-envs", type=int, default=None, help="default: preset or 8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="runs/train", help="SB3 logger folder")
    parser.add_argument("--tensorboard", action="store_true", help="also TensorBoard events")
    parser.add_argument("--log-interval", type=int, default=1, help="updates between log dumps")
    parser.add_argument("--save", default=None, help="save the model to this .zip path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import configure

    from erc_gym.diagnostics import EntropyDynamicsCallback
    from erc_gym.sb3 import ERCPPO
    from erc_gym.sb3.presets import PRESETS, make_env_kwargs, ppo_kwargs

    preset = args.env_id in PRESETS and args.algo != "a2c"
    kwargs = ppo_kwargs(args.env_id, seed=args.seed, verbose=0) if preset else {"seed": args.seed}
    kwargs.pop("policy", None)
    n_envs = args.n_envs or (make_env_kwargs(args.env_id)["n_envs"] if preset else 8)
    steps = args.steps or (PRESETS[args.env_id]["n_timesteps"] if preset else 100_000)
    env = make_vec_env(args.env_id, n_envs=n_envs, seed=args.seed)
    model: Any
    if args.algo == "ercppo":
        erc = (None, None) if args.no_erc else (args.erc_low, args.erc_high)
        model = ERCPPO(
            "MlpPolicy",
            env,
            erc_low=erc[0],
            erc_high=erc[1],
            clip_range_high=args.clip_range_high,
            clip_variant=args.clip_variant,
            dual_clip=args.dual_clip,
            **kwargs,
        )
    else:
        cls = PPO if args.algo == "ppo" else A2C
        model = cls("MlpPolicy", env, **kwargs)
    formats = ["stdout", "json"] + (["tensorboard"] if args.tensorboard else [])
    model.set_logger(configure(args.log_dir, formats))
    band = (args.erc_low, args.erc_high)
    model.learn(
        steps,
        callback=EntropyDynamicsCallback(band=band),
        log_interval=args.log_interval,
        progress_bar=not args.no_progress,
    )
    model.logger.dump(model.num_timesteps)  # the last update's keys
    if args.save:
        model.save(args.save)
        print(f"saved {args.save}")
    print(f"logs: {Path(args.log_dir) / 'progress.json'}")


if __name__ == "__main__":
    main()
