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
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from erc_gym import __version__
from erc_gym.cli_args import (
    CliParser,
    fail,
    non_negative_float,
    non_negative_int,
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
    parser.add_argument("--version", action="version", version=f"erc-gym {__version__}")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        if not argv:
            fail(parser.prog, f"give a command: {', '.join(COMMANDS)}")
        raise SystemExit(0)
    args = parser.parse_args(argv[:1])
    module, func = COMMANDS[args.command][0].split(":")
    try:
        getattr(importlib.import_module(module), func)(argv[1:])
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at exit
    except BrokenPipeError:
        # ``erc-gym experiment --list | head``: the reader left; end quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, the shell's status for this case


@contextlib.contextmanager
def file_errors(prog: str) -> Iterator[None]:
    """An ``OSError`` that escapes the block (a full disk, a read-only runs folder) becomes one
    line naming the path and the cause, and exit 1: files already written stay as they were,
    as every writer replaces its file atomically (:mod:`erc_gym.atomic`)."""
    try:
        yield
    except OSError as err:
        import errno

        where = err.filename if err.filename is not None else "a file"
        cause = err.strerror or str(err)
        full = err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)
        line = f"cannot write {where} ({cause})" if full else f"{where}: {cause}"
        sys.stderr.write(f"{prog}: error: {line}\n")
        raise SystemExit(1) from None


def _experiment_dirs(path: Path, prog: str) -> list[Path]:
    """``path`` itself if it is an experiment folder, else its sub-folders that are."""
    from erc_gym.lab.analysis import experiment_above, find_experiments

    try:
        found, notes = find_experiments(path)
    except FileNotFoundError as err:
        fail(prog, str(err))
    except OSError as err:  # e.g. a name longer than the file system allows
        fail(prog, f"{path}: {err.strerror or err}")
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
        try:
            spec = load_experiment(args.name)
        except OSError as err:
            if isinstance(err, FileNotFoundError):
                raise
            parser.exit(2, f"erc-gym experiment: error: {args.name}: {err.strerror or err}\n")
        if args.set:
            spec = override_settings(spec, dict(args.set))
        with file_errors(parser.prog):  # the runs folder itself (a run's own errors are its log)
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

        with file_errors(parser.prog):
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
        with file_errors(parser.prog):
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
        with file_errors(parser.prog):
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


def _batch_size(text: str) -> int:
    """A mini-batch of at least 2 samples (SB3's PPO normalises advantages within it)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (SB3's PPO needs 2), got {value}")
    return value


#: Most environments ``erc-gym train`` runs: SB3's DummyVecEnv steps them one after another in
#: this process, so more only cost memory and time (a typo of 10**9 would hang the command).
MAX_ENVS = 1024


def _n_envs(text: str) -> int:
    value = positive_int(text)
    if value > MAX_ENVS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_ENVS} (they step one after another in this process), got {value}"
        )
    return value


def train_main(argv: list[str] | None = None) -> None:
    """``erc-gym train ENV_ID``: an SB3 algorithm with ERC options and entropy diagnostics."""
    parser = CliParser(
        prog="erc-gym train",
        description="Train ERCPPO (or SB3's PPO / A2C) on a Gymnasium id (ERC and the entropy "
        "diagnostics need discrete actions; --no-erc or --algo ppo/a2c train any). Zoo "
        "hyperparameters are used when erc_gym.sb3.presets has the id. Logs SB3's keys and "
        "the diagnostics/* keys of EntropyDynamicsCallback to LOG_DIR/progress.json (a new "
        "folder per run by default); prints a progress bar and a short summary (SB3's tables "
        "with --verbose). A --save or log write that fails (a full disk) ends with one line: "
        "the previous model file is kept, and the new one saved to the temporary folder.",
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
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="constant learning rate (replaces the preset's schedule; default: preset or SB3's)",
    )
    parser.add_argument(
        "--n-epochs",
        type=positive_int,
        default=None,
        help="ERCPPO / PPO: epochs over each rollout (default: preset or SB3's 10)",
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        help="ERCPPO / PPO: mini-batch size (default: preset or SB3's 64); optimiser steps per "
        "rollout = n_epochs x n_envs x n_steps / batch_size",
    )
    parser.add_argument(
        "--target-kl",
        type=positive_float,
        default=None,
        help="ERCPPO / PPO: SB3's early stop, ending a rollout's epochs once the approximate KL "
        "to the rollout's policy exceeds 1.5 x this (default: off)",
    )
    parser.add_argument(
        "--ent-coef",
        type=non_negative_float,
        default=None,
        help="entropy bonus coefficient (default: preset or SB3's 0)",
    )
    parser.add_argument(
        "--n-envs", type=_n_envs, default=None, help=f"default: preset or 8 (at most {MAX_ENVS})"
    )
    parser.add_argument(
        "--eval-episodes",
        type=non_negative_int,
        default=0,
        help="after training, the mean return of this many deterministic episodes on a "
        "separately seeded env (default 0: none)",
    )
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument(
        "--log-dir",
        default=None,
        help="SB3 logger folder (default: a new folder per run, runs/train/<env>-<algo>-<n>)",
    )
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
    ppo_only = {
        "--n-epochs": args.n_epochs,
        "--batch-size": args.batch_size,
        "--target-kl": args.target_kl,
    }
    given = [f"{flag} {value}" for flag, value in ppo_only.items() if value is not None]
    if given and args.algo == "a2c":  # A2C has no epochs, mini-batches or KL early stop
        fail(prog, f"{given[0]} needs --algo ercppo or ppo, got --algo a2c")
    writable_dir(prog, "--log-dir", args.log_dir or TRAIN_LOGS)
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
    overrides = {
        "learning_rate": args.lr,
        "n_epochs": args.n_epochs,
        "batch_size": args.batch_size,
        "target_kl": args.target_kl,
        "ent_coef": args.ent_coef,
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
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
    # the entropy diagnostics need the full action distribution: a Discrete action space
    discrete = isinstance(model.action_space, gym.spaces.Discrete)
    if not discrete:
        print(
            f"note: {args.env_id} has a {type(model.action_space).__name__} action space: no "
            "diagnostics/* keys (they need discrete actions)",
            file=sys.stderr,
        )
    log_dir = args.log_dir or _new_log_dir(args.env_id, args.algo)
    formats = (["stdout"] if args.verbose else []) + ["json"]
    formats += ["tensorboard"] if args.tensorboard else []
    model.set_logger(configure(log_dir, formats))
    start = time.perf_counter()
    try:
        model.learn(
            steps,
            callback=EntropyDynamicsCallback(band=band) if discrete else None,
            log_interval=args.log_interval,
            progress_bar=not args.no_progress,
        )
        last = dict(model.logger.name_to_value)
        model.logger.dump(model.num_timesteps)  # the last update's keys
    except OSError as err:  # the logs are what this process writes while it trains
        where = err.filename or f"{log_dir}/progress.json"
        sys.stderr.write(
            f"{prog}: error: training stopped at step {model.num_timesteps}: cannot write "
            f"{where} ({err.strerror or err})\n"
        )
        raise SystemExit(1) from None
    seconds = time.perf_counter() - start
    print(_train_summary(args, model, last, seconds))
    if args.eval_episodes:
        from stable_baselines3.common.evaluation import evaluate_policy

        eval_env = make_vec_env(args.env_id, n_envs=1, seed=args.seed + 10_000)
        mean, std = evaluate_policy(
            model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True
        )
        eval_env.close()
        print(
            f"evaluation: mean return {mean:.2f} (std {std:.2f}) over {args.eval_episodes} "
            "deterministic episodes"
        )
    if args.save is not None:
        print(f"saved {_save_model(prog, model, args.save)}")
    print(f"logs: {Path(log_dir) / 'progress.json'}")


#: Parent of ``erc-gym train``'s log folders when no --log-dir is given.
TRAIN_LOGS = "runs/train"


def _new_log_dir(env_id: str, algo: str) -> str:
    """A folder no earlier run used: ``runs/train/<env>-<algo>-<n>``, n one above the largest.

    ``mkdir`` claims it, so two commands started at once get two folders.
    """
    stem = f"{env_id.replace('/', '-')}-{algo}"
    base = Path(TRAIN_LOGS)
    taken = [p.name[len(stem) + 1 :] for p in base.glob(f"{stem}-*")] if base.is_dir() else []
    n = 1 + max((int(t) for t in taken if t.isdigit()), default=0)
    while True:
        folder = base / f"{stem}-{n}"
        try:
            folder.mkdir(parents=True)
            return str(folder)
        except FileExistsError:
            n += 1


def _save_model(prog: str, model: Any, path: str) -> str:
    """Save ``model`` as SB3 would, to ``path`` (``.zip`` added when it has no suffix), atomically.

    A save that fails (a full disk, a read-only folder) keeps the previous file, tries the
    temporary folder instead so the trained model is not lost, and ends with one line and exit 1.
    Returns the path written.
    """
    import io
    import tempfile

    from erc_gym.atomic import atomic_write

    target = Path(path)
    if not target.suffix:
        target = target.with_suffix(".zip")  # as SB3's save() names it
    buffer = io.BytesIO()
    model.save(buffer)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, buffer.getvalue())
        return str(target)
    except OSError as err:
        cause = f"cannot write {err.filename or target} ({err.strerror or err})"
    kept = f"; the previous {target} is unchanged" if target.exists() else ""
    rescue = Path(tempfile.gettempdir()) / f"erc-gym-{target.stem}-{os.getpid()}.zip"
    try:
        rescue.write_bytes(buffer.getvalue())
        instead = f"; the model was saved to {rescue} instead"
    except OSError:
        rescue.unlink(missing_ok=True)
        instead = "; the model could not be saved anywhere"
    sys.stderr.write(f"{prog}: error: --save {path}: {cause}{kept}{instead}\n")
    raise SystemExit(1)


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
