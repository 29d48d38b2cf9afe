"""The ``erc-gym`` command line: one entry point, one subcommand per job.

``erc-gym train``       an SB3 algorithm (ERCPPO, PPO, A2C) on any Gymnasium id
``erc-gym llm``         a causal LM with GRPO / DAPO / GPPO (+ERC)
``erc-gym experiment``  a shipped or custom experiment grid (runs in parallel, resumable)
``erc-gym plot``        figures of a runs folder
``erc-gym report``      Markdown + HTML report of a runs folder (with the figures)
``erc-gym demo``        PPO vs PPO+ERC on one toy batch, printed step by step
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from erc_gym.cli_args import (
    CliParser,
    fail,
    positive_float,
    positive_int,
    seed,
    setting,
    writable_dir,
    writable_file,
)

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
    parser = CliParser(
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
    try:
        getattr(importlib.import_module(module), func)(argv[1:])
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at exit
    except BrokenPipeError:
        # ``erc-gym experiment --list | head``: the reader left; end quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, the shell's status for this case


def _experiment_dirs(path: Path, prog: str) -> list[Path]:
    """``path`` itself if it is an experiment folder, else its sub-folders that are."""
    from erc_gym.lab.analysis import experiment_above, find_experiments

    try:
        found, notes = find_experiments(path)
    except FileNotFoundError as err:
        fail(prog, str(err))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not found:
        above = experiment_above(path)
        if above is not None:
            fail(prog, f"{path} is inside the experiment folder {above}; give that folder")
        fail(prog, f"no runs below {path} (expected <variant>/<seed>/config.json)")
    return found


def experiment_main(argv: list[str] | None = None) -> None:
    """``erc-gym experiment NAME``: run a grid, then write its report."""
    import shlex
    import signal

    from erc_gym.lab.config import list_experiments

    argv = list(sys.argv[1:] if argv is None else argv)
    shipped = list_experiments()
    parser = CliParser(
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
        "--workers", type=positive_int, default=None, help="processes (default: cores)"
    )
    parser.add_argument(
        "--launcher",
        choices=("local", "ray"),
        default="local",
        help="local: processes on this machine (default); ray: one task per run on a Ray "
        "cluster (pip install 'erc-gym[ray]'; docs/cluster.md)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="with --launcher ray: the cluster's head HOST:PORT (default: RAY_ADDRESS, else a "
        "cluster started on this machine, else a new local one)",
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=None, help="override the number of seeds"
    )
    parser.add_argument(
        "--set",
        type=setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a trainer setting for every run, over the config's settings and envs (repeat it; "
        "values in JSON, e.g. --set steps=600 --set lr=1e-4 --set ops=+-*)",
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
    from erc_gym.lab.config import ConfigError, load_experiment, override_settings
    from erc_gym.lab.ray_launcher import ClusterError, RayLauncher
    from erc_gym.lab.rundir import ConfigMismatch
    from erc_gym.lab.runner import ExperimentInterrupted, RunsFailed, run_experiment

    launcher = None
    if args.launcher == "ray":
        if args.workers is not None:
            parser.error("--workers is for the local launcher; a Ray run takes its resources")
        try:
            launcher = RayLauncher(address=args.address)
        except ClusterError as err:
            parser.exit(2, f"erc-gym experiment: error: {err}\n")
    elif args.address is not None:
        parser.error("--address needs --launcher ray")

    # Between the runner restoring its signal handlers and this process exiting, a second Ctrl-C
    # or SIGTERM must not turn a clean "stopped by ..." exit into a KeyboardInterrupt traceback
    # (or a death by signal): see _late_signal. Restored once the runs end uninterrupted.
    late = {s: signal.signal(s, _late_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupted = False
    try:
        spec = load_experiment(args.name)
        if args.set:
            spec = override_settings(spec, dict(args.set))
        run_experiment(
            spec,
            args.runs,
            workers=args.workers,
            resume=not args.restart,
            seeds=args.seeds,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            launcher=launcher,
        )
    except (FileNotFoundError, ConfigError, ConfigMismatch, ClusterError) as err:
        parser.exit(2, f"erc-gym experiment: error: {err}\n")
    except RunsFailed as err:
        parser.exit(1, f"erc-gym experiment: error: {err}\n")
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
        parser.exit(130, "erc-gym experiment: stopped by SIGINT; the same command resumes\n")
    except ExperimentInterrupted as err:
        interrupted = True  # leaving: late signals stay ignored until the process is gone
        again = shlex.join(["erc-gym", "experiment", *argv])
        parser.exit(
            128 + err.signum,
            f"erc-gym experiment: stopped by {signal.Signals(err.signum).name}: "
            f"{err.finished}/{err.total} runs finished, {len(err.stopped)} stopped at their last "
            f"checkpoint; resume with: {again}\n",
        )
    finally:
        if not interrupted:
            for signum, handler in late.items():
                signal.signal(signum, handler)
    if not args.no_report:
        from erc_gym.lab.report import write_report

        report = write_report(Path(args.runs) / spec["name"])
        print(f"report: {report}")


def plot_main(argv: list[str] | None = None) -> None:
    """``erc-gym plot RUNS_DIR``: PNG and SVG figures of every experiment below a folder."""
    parser = CliParser(
        prog="erc-gym plot",
        description="Curves (mean over seeds, 95% bootstrap band) and entropy-ratio heat maps, "
        "written to <experiment>/figures/ as PNG and SVG.",
    )
    parser.add_argument("runs_dir", type=Path, help="an experiment folder or a runs folder")
    args = parser.parse_args(argv)
    from erc_gym.lab.plots import plot_experiment

    for folder in _experiment_dirs(args.runs_dir, parser.prog):
        for path in plot_experiment(folder):
            print(path)


def _late_signal(signum: int, frame: Any) -> None:
    """``erc-gym experiment``'s handler outside the runner's own: the default behaviour (Ctrl-C
    raises KeyboardInterrupt, SIGTERM ends the process), except once a first signal has stopped
    the runs -- then the process is already leaving with its "stopped by ..." line, and a second
    signal must not turn that into a traceback or a death by signal."""
    import os
    import signal

    from erc_gym.lab.runner import stopped_by

    if stopped_by() is not None:
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def report_main(argv: list[str] | None = None) -> None:
    """``erc-gym report RUNS_DIR``: report.md and report.html of every experiment below it."""
    parser = CliParser(
        prog="erc-gym report",
        description="Final-score table (IQM, 95% bootstrap CI), entropy diagnostics and figures, "
        "written to <experiment>/report.md and report.html.",
    )
    parser.add_argument("runs_dir", type=Path, help="an experiment folder or a runs folder")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    from erc_gym.lab.report import write_report

    for folder in _experiment_dirs(args.runs_dir, parser.prog):
        try:
            print(write_report(folder, plots=not args.no_plots))
        except (FileNotFoundError, ValueError) as err:  # e.g. a hand-edited experiment.json
            fail(parser.prog, str(err))


def _erc_band(prog: str, low: float | None, high: float | None) -> tuple[float, float]:
    """Both bounds or neither (the paper's 0.95/1.05): the same rule as ``erc-gym llm``."""
    if (low is None) != (high is None):
        given = f"--erc-low {low}" if low is not None else f"--erc-high {high}"
        fail(prog, f"--erc-low and --erc-high go together: got only {given}")
    return (0.95, 1.05) if low is None or high is None else (low, high)


def train_main(argv: list[str] | None = None) -> None:
    """``erc-gym train ENV_ID``: an SB3 algorithm with ERC options and entropy diagnostics."""
    parser = CliParser(
        prog="erc-gym train",
        description="Train ERCPPO (or SB3's PPO / A2C) on a Gymnasium id with discrete actions. "
        "Zoo hyperparameters are used when erc_gym.sb3.presets has the id. Logs SB3's keys and "
        "the diagnostics/* keys of EntropyDynamicsCallback to LOG_DIR/progress.json; prints a "
        "progress bar and a short summary (SB3's tables with --verbose).",
    )
    parser.add_argument("env_id", help="Gymnasium id, e.g. CartPole-v1 or erc_gym/VocabBandit-v0")
    parser.add_argument("--algo", choices=["ercppo", "ppo", "a2c"], default="ercppo")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="default: preset or 100000"
    )
    parser.add_argument(
        "--erc-low",
        type=positive_float,
        default=None,
        help="ERCPPO band, lower bound (give both bounds or neither; default 0.95)",
    )
    parser.add_argument(
        "--erc-high",
        type=positive_float,
        default=None,
        help="ERCPPO band, upper bound (default 1.05)",
    )
    parser.add_argument("--no-erc", action="store_true", help="ERCPPO with ERC off (= SB3 PPO)")
    parser.add_argument(
        "--erc-target-clip-fraction",
        type=positive_float,
        default=None,
        help="ERCPPO: this project's adaptive band (not the paper's): widen or narrow the band "
        "after each update so that ERC clips about this share (0-1) of the off-policy samples, "
        "starting from --erc-low/--erc-high (default: the fixed band)",
    )
    parser.add_argument(
        "--clip-range-high", type=positive_float, default=None, help="DAPO clip-higher"
    )
    parser.add_argument("--clip-variant", choices=["ppo", "gppo"], default="ppo")
    parser.add_argument(
        "--dual-clip", type=positive_float, default=None, help="dual-clip constant c > 1"
    )
    parser.add_argument("--n-envs", type=positive_int, default=None, help="default: preset or 8")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--log-dir", default="runs/train", help="SB3 logger folder")
    parser.add_argument("--tensorboard", action="store_true", help="also TensorBoard events")
    parser.add_argument(
        "--log-interval", type=positive_int, default=1, help="updates between log dumps"
    )
    parser.add_argument("--save", default=None, help="save the model to this .zip path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--verbose", action="store_true", help="print SB3's log table after every update"
    )
    args = parser.parse_args(argv)
    prog = parser.prog
    band = _erc_band(prog, args.erc_low, args.erc_high)
    ercppo_only = {
        "--erc-target-clip-fraction": args.erc_target_clip_fraction,
        "--clip-range-high": args.clip_range_high,
        "--clip-variant": None if args.clip_variant == "ppo" else args.clip_variant,
        "--dual-clip": args.dual_clip,
    }
    given = [f"{flag} {value}" for flag, value in ercppo_only.items() if value is not None]
    if given and args.algo != "ercppo":  # SB3's PPO / A2C would silently ignore them
        fail(prog, f"{given[0]} needs --algo ercppo, got --algo {args.algo}")
    writable_dir(prog, "--log-dir", args.log_dir)
    if args.save is not None:
        if not args.save.strip():
            fail(prog, "--save '': give a file path, e.g. --save model.zip")
        writable_file(prog, "--save", args.save)

    import gymnasium as gym
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import configure

    import erc_gym.envs  # noqa: F401  (registers the erc_gym/* ids)
    from erc_gym.sb3 import ERCPPO, EntropyDynamicsCallback
    from erc_gym.sb3.presets import PRESETS, make_env_kwargs, ppo_kwargs

    try:
        gym.spec(args.env_id)
    except gym.error.Error as err:
        fail(prog, f"unknown environment id {args.env_id!r}: {err}")
    verbose = int(args.verbose)
    preset = args.env_id in PRESETS and args.algo != "a2c"
    kwargs: dict[str, Any] = (
        ppo_kwargs(args.env_id, seed=args.seed, verbose=verbose)
        if preset
        else {"seed": args.seed, "verbose": verbose}
    )
    kwargs.pop("policy", None)
    n_envs = args.n_envs or (make_env_kwargs(args.env_id)["n_envs"] if preset else 8)
    steps = args.steps or (PRESETS[args.env_id]["n_timesteps"] if preset else 100_000)
    model: Any
    try:
        env = make_vec_env(args.env_id, n_envs=n_envs, seed=args.seed)
        if args.algo == "ercppo":
            erc = (None, None) if args.no_erc else band
            model = ERCPPO(
                "MlpPolicy",
                env,
                erc_low=erc[0],
                erc_high=erc[1],
                erc_target_clip_fraction=args.erc_target_clip_fraction,
                clip_range_high=args.clip_range_high,
                clip_variant=args.clip_variant,
                dual_clip=args.dual_clip,
                **kwargs,
            )
        else:
            cls = PPO if args.algo == "ppo" else A2C
            model = cls("MlpPolicy", env, **kwargs)
    except (ValueError, AssertionError, gym.error.Error) as err:
        fail(prog, f"{args.env_id} with --algo {args.algo}: {err}")
    formats = (["stdout"] if args.verbose else []) + ["json"]
    formats += ["tensorboard"] if args.tensorboard else []
    model.set_logger(configure(args.log_dir, formats))
    start = time.perf_counter()
    model.learn(
        steps,
        callback=EntropyDynamicsCallback(band=band),
        log_interval=args.log_interval,
        progress_bar=not args.no_progress,
    )
    last = dict(model.logger.name_to_value)
    model.logger.dump(model.num_timesteps)  # the last update's keys
    seconds = time.perf_counter() - start
    print(_train_summary(args, model, last, seconds))
    if args.save is not None:
        model.save(args.save)
        print(f"saved {args.save}")
    print(f"logs: {Path(args.log_dir) / 'progress.json'}")


def _train_summary(args: Any, model: Any, last: dict[str, Any], seconds: float) -> str:
    """Three lines: what ran, the recent episodes, the last update's ERC figures."""
    import numpy as np

    erc = "ERC off" if args.algo != "ercppo" or args.no_erc else "ERC on"
    lines = [f"{args.env_id}: {args.algo} ({erc}), {model.num_timesteps} steps in {seconds:.1f} s"]
    episodes = list(model.ep_info_buffer or [])
    if episodes:
        ret = float(np.mean([e["r"] for e in episodes]))
        length = float(np.mean([e["l"] for e in episodes]))
        lines.append(
            f"mean episode return over the last {len(episodes)} episodes: {ret:.2f} "
            f"(length {length:.1f})"
        )
    keys = [
        ("train/erc_clip_fraction", "ERC clip fraction"),
        ("train/clip_fraction", "PPO clip fraction"),
        ("train/entropy_loss", "entropy loss"),
    ]
    figures = [f"{name} {last[k]:.4f}" for k, name in keys if k in last]
    if figures:
        lines.append("last update: " + ", ".join(figures))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
