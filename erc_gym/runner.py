"""Experiment runner: a grid of algorithm x ERC band x environment x seed, in parallel processes.

An experiment is a small JSON file (the shipped ones are package data in ``erc_gym/configs/``,
listed by ``erc-gym experiment --list``)::

    {
      "name": "quick",
      "kind": "bandit",                      # "sb3" (ERCPPO), "bandit" or "llm"
      "seeds": 3,                            # a count (seeds 0..n-1) or a list of seeds
      "algorithms": ["ppo"],                 # any of "ppo", "dapo", "gppo"
      "erc": [null, [0.95, 1.05]],           # null = ERC off, [low, high] = a band
      "envs": [{"label": "V4096", "vocab_size": 4096}],
      "settings": {"iterations": 40},        # shared by every run
      "axes": {"steps_per_rollout": [2, 8], "lr": [0.05, 0.2]},  # optional stress grid
      "baseline": "stress_bandit"            # optional: an experiment the report compares with
    }

The file is checked against a schema (:mod:`erc_gym.experiment_config`) before any run starts.
``axes`` (optional) repeats the grid on every point of an off-policy stress map; see
:mod:`erc_gym.stress` for what each axis sets per kind. Variant names then end in ``-s<S>-lr<lr>``.
``baseline`` (optional) names another experiment in the same runs folder whose stress-map runs the
report adds (e.g. the fixed bands an adaptive band is compared with). A run with
``erc_target_clip_fraction`` in its settings (:mod:`erc_gym.adaptive_band`) gets ``-target<f>``
after its band in the variant name.

Every run writes ``runs/<experiment>/<variant>/<seed>/{config.json, metrics.jsonl}`` (the
variant name joins the env label, the algorithm and the band, e.g. ``V4096-ppo-erc0.95-1.05``),
``run.json`` (the run's resolved config: every trainer setting, defaults included) and a ``done``
marker when it finishes. Running the experiment again skips finished runs and resumes unfinished
ones from their last checkpoint (``checkpoint.pt`` / ``checkpoint.zip``).

Safety off the happy path:

* a run folder whose ``run.json`` differs from the current config is refused before anything
  runs, naming the differing keys (``overwrite=True`` / ``--overwrite`` starts those runs over);
* each run folder is locked (:mod:`filelock`, an OS lock released even when its holder is
  killed) while a process trains it: a second ``erc-gym experiment`` on the same folder skips the
  runs the first holds and says so;
* runs go to one child process each (``multiprocessing``), which dies with the main process
  (``PR_SET_PDEATHSIG`` on Linux, a parent-pid watchdog elsewhere) -- a
  ``ProcessPoolExecutor`` can neither stop a running task nor outlive-proof its workers.
  Ctrl-C / SIGTERM stops the workers within seconds and raises :class:`ExperimentInterrupted`;
  checkpoints are written atomically, so interrupted runs resume from their last one.

``kind`` chooses the trainer:

* ``sb3``: :class:`~erc_gym.sb3.ERCPPO` on a Gymnasium id (``envs[i]["id"]``) with the zoo preset
  of :mod:`erc_gym.sb3.presets`; ERC off is ERCPPO with ``erc_low=erc_high=None`` (identical to
  SB3 PPO). ``dapo`` adds ``clip_range_high=0.28`` and dual-clip 10, ``gppo`` the
  gradient-preserving clip with dual-clip 10. Presets with ``normalize`` get SB3's
  ``VecNormalize`` (its statistics are checkpointed too). Logged in strict JSON
  (:class:`~erc_gym.sb3.jsonlog.StrictJSONOutputFormat`) plus
  :class:`~erc_gym.diagnostics.EntropyDynamicsCallback` and periodic evaluations.
* ``bandit``: :func:`erc_gym.bandit.train_bandit` (settings: :class:`~erc_gym.bandit.BanditConfig`).
* ``llm``: :class:`erc_gym.llm.ERCTrainer` (settings: :class:`~erc_gym.llm.TrainerConfig`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import difflib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from erc_gym.experiment_config import ALGORITHMS, KINDS, ConfigError, validate_experiment
from erc_gym.jsonl import repair_jsonl

__all__ = [
    "ALGORITHMS",
    "CONFIG_DIR",
    "KINDS",
    "ConfigMismatch",
    "ExperimentInterrupted",
    "RunLocked",
    "RunSpec",
    "RunsFailed",
    "expand",
    "find_experiment",
    "list_experiments",
    "load_experiment",
    "resolved_config",
    "run_experiment",
    "run_one",
    "stopped_by",
]

#: Where the shipped experiment configs live (package data; ``experiments/configs`` links here).
CONFIG_DIR = Path(str(resources.files("erc_gym").joinpath("configs")))
_SB3_ALGO_KWARGS: dict[str, dict[str, Any]] = {
    "ppo": {},
    "dapo": {"clip_range_high": 0.28, "dual_clip": 10.0},
    "gppo": {"clip_variant": "gppo", "dual_clip": 10.0},
}
#: Keys of ``run.json`` that name the run (the rest is the trainer's resolved settings).
_IDENTITY = ("experiment", "variant", "seed", "kind", "algorithm", "erc", "env_label")
#: Trainer settings added after run folders were first recorded, with the default that
#: reproduces the older runs: left out of ``run.json`` at that default, so those folders still
#: match (and resume) instead of being refused as made with another config.
_ADDED_SETTINGS: dict[str, Any] = {"erc_target_clip_fraction": None}
#: Seconds that stopping workers get after SIGTERM before SIGKILL.
_STOP_GRACE_S = 5.0


class ConfigMismatch(ValueError):
    """Existing run folders were made with a different config (the message names the keys)."""


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


class RunsFailed(RuntimeError):
    """Some runs of the grid raised; each one's traceback is in its folder's ``error.log``."""


class ExperimentInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the experiment; unfinished runs resume from their checkpoints.

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        finished: runs of the grid with a ``done`` marker.
        total: runs in the grid.
        stopped: runs that were in progress (resumable).
    """

    def __init__(self, signum: int, finished: int, total: int, stopped: list[Path]) -> None:
        self.signum = signum
        self.finished = finished
        self.total = total
        self.stopped = stopped
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: {finished}/{total} runs finished, {len(stopped)} in progress stopped "
            "at their last checkpoint"
        )


class _SigTerm(KeyboardInterrupt):
    """SIGTERM turned into an exception when runs train in this process (``workers=1``)."""


@dataclass
class RunSpec:
    """One run of an experiment's grid."""

    experiment: str
    variant: str
    seed: int
    kind: str
    algorithm: str
    erc: tuple[float, float] | None
    env: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    env_label: str = "env"
    axes: dict[str, Any] = field(default_factory=dict)

    def folder(self, root: str | Path) -> Path:
        """``root/<experiment>/<variant>/<seed>``."""
        return Path(root) / self.experiment / self.variant / str(self.seed)

    def meta(self) -> dict[str, Any]:
        """What ``config.json`` records about the run besides the trainer's own settings."""
        return {
            "experiment": self.experiment,
            "variant": self.variant,
            "seed": self.seed,
            "kind": self.kind,
            "algorithm": self.algorithm,
            "erc": list(self.erc) if self.erc is not None else None,
            "env": self.env,
            "env_label": self.env_label,
            "settings": self.settings,
            "axes": self.axes,
        }


def list_experiments() -> dict[str, str]:
    """Shipped experiment names and their descriptions."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        try:
            out[path.stem] = str(json.loads(path.read_text()).get("description", ""))
        except (OSError, ValueError):
            out[path.stem] = ""
    return out


def find_experiment(name: str) -> Path:
    """Path of an experiment config: an existing file, or a name in :data:`CONFIG_DIR`."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name}.json"
    if shipped.is_file():
        return shipped
    if path.is_dir():
        raise FileNotFoundError(f"experiment {name!r} is a folder; give a JSON config file")
    names = sorted(list_experiments())
    close = difflib.get_close_matches(path.stem, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise FileNotFoundError(
        f"no experiment {name!r}: not a file, and not one of the shipped configs ({hint}"
        f"shipped: {', '.join(names)})"
    )


def load_experiment(name: str) -> dict[str, Any]:
    """Read an experiment config and check it against the schema (see the module docstring).

    Raises:
        FileNotFoundError: neither a file nor a shipped name.
        ConfigError: not JSON, or not the schema (one line naming the key and value).
    """
    path = find_experiment(name)
    try:
        raw = json.loads(path.read_text(), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({err})") from None
    return validate_experiment(raw, str(path))


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` keeps the last of two equal keys: a copied-and-edited line would silently win."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(
                f"key {key!r} appears twice in one object ({out[key]!r:.40} and {value!r:.40}); "
                "keep one"
            )
        out[key] = value
    return out


def _band_label(band: tuple[float, float] | None) -> str:
    return "" if band is None else f"-erc{band[0]:g}-{band[1]:g}"


def _seed_list(seeds: int | list[int]) -> list[int]:
    return list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]


def _stress_points(spec: dict[str, Any], env: dict[str, Any]) -> list[tuple[str, dict, dict]]:
    """``(variant suffix, axis point, settings)`` per point of the optional ``axes`` grid."""
    settings = dict(spec.get("settings", {}))
    if not spec.get("axes"):
        return [("", {}, settings)]
    from erc_gym.stress import axis_label, axis_points, axis_settings

    return [
        (axis_label(p), p, axis_settings(spec["kind"], env, settings, p))
        for p in axis_points(spec["axes"])
    ]


def expand(spec: dict[str, Any]) -> list[RunSpec]:
    """The experiment's grid: env x stress point x algorithm x ERC band x seed (nesting order)."""
    seed_list = _seed_list(spec.get("seeds", 3))
    runs: list[RunSpec] = []
    for env in spec["envs"]:
        env = dict(env)
        label = env.pop("label", None) or env.get("id") or "env"
        for suffix, point, settings in _stress_points(spec, env):
            for algo in spec["algorithms"]:
                for band in spec.get("erc", [None]):
                    erc = None if band is None else (float(band[0]), float(band[1]))
                    target = {**settings, **env}.get("erc_target_clip_fraction")
                    rule = "" if erc is None or target is None else f"-target{float(target):g}"
                    variant = f"{label}-{algo}{_band_label(erc)}{rule}{suffix}"
                    runs.extend(
                        RunSpec(
                            experiment=spec["name"],
                            variant=variant,
                            seed=seed,
                            kind=spec["kind"],
                            algorithm=algo,
                            erc=erc,
                            env=env,
                            settings=dict(settings),
                            env_label=str(label),
                            axes=dict(point),
                        )
                        for seed in seed_list
                    )
    return runs


def _trainer_settings(run: RunSpec) -> dict[str, Any]:
    """Settings of a bandit / LLM trainer config: shared, then env-specific, then the grid's."""
    low, high = run.erc if run.erc is not None else (None, None)
    return {
        **run.settings,
        **run.env,
        "loss": run.algorithm,
        "erc_low": low,
        "erc_high": high,
        "seed": run.seed,
    }


def _sb3_settings(run: RunSpec) -> dict[str, Any]:
    """An sb3 run's settings: the zoo preset, then the config's, with the runner's keys filled."""
    from erc_gym.sb3.presets import PRESETS

    env_id = run.env["id"]
    preset = {k: v for k, v in PRESETS[env_id].items() if k != "reference"}
    own = {**run.settings, **{k: v for k, v in run.env.items() if k != "id"}}
    steps = int(own.pop("steps", None) or preset["n_timesteps"])
    out = {**preset, **own, "id": env_id, "steps": steps}
    out.setdefault("eval_every", max(steps // 10, 1))
    out.setdefault("eval_episodes", 10)
    return {**out, **_SB3_ALGO_KWARGS[run.algorithm], "seed": run.seed}


def resolved_config(run: RunSpec) -> dict[str, Any]:
    """What ``run.json`` records: the run's identity and every trainer setting, defaults included.

    A re-run compares this with the folder's ``run.json``; any difference is refused
    (:class:`ConfigMismatch`) unless asked to start over.
    """
    identity = {k: v for k, v in run.meta().items() if k in _IDENTITY}
    if run.kind == "sb3":
        trainer = _sb3_settings(run)
    elif run.kind == "bandit":
        from erc_gym.bandit import BanditConfig

        trainer = dataclasses.asdict(BanditConfig(**_trainer_settings(run)))
    else:
        from erc_gym.llm.trainer import TrainerConfig

        config = TrainerConfig(**{"device": "cpu", **_trainer_settings(run)})
        trainer = dataclasses.asdict(config)
        for key in ("run_dir", "name", "progress"):
            trainer.pop(key)
    for key, default in _ADDED_SETTINGS.items():
        if key in trainer and trainer[key] == default:
            del trainer[key]
    return {**identity, "trainer": json.loads(json.dumps(trainer))}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flat(v, key + ".")
        else:
            out[key] = v
    return out


def config_diff(folder: Path, resolved: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each setting where the folder's ``run.json`` differs (``[]``: same
    or no record yet)."""
    path = folder / "run.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # no record yet (or being written: re-checked under the lock)
    before, after = _flat(old), _flat(resolved)
    return [
        f"{k.removeprefix('trainer.')}: {before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _write_config(folder: Path, run: RunSpec) -> None:
    """Merge the runner's record of the run into ``config.json`` (beside the trainer's keys)."""
    path = folder / "config.json"
    try:
        own = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        own = {}
    _write_json_atomic(path, {**own, **run.meta()})


def _clear(folder: Path) -> None:
    """Delete a run's outputs (not its lock file) to start it over."""
    for child in folder.iterdir():
        if child.name == ".lock":
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _mismatch_message(folder: Path, diffs: list[str]) -> str:
    shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
    return f"{folder} was made with another config ({shown})"


def run_one(run: RunSpec, root: str | Path, resume: bool = True, overwrite: bool = False) -> Path:
    """Train one run (resuming it when possible) and mark it done; returns its folder.

    Holds the folder's lock while it works. A finished run with the same config is left alone.

    Raises:
        RunLocked: another process trains this run now.
        ConfigMismatch: the folder holds a run of another config and ``overwrite`` is False.
    """
    from filelock import FileLock, Timeout

    folder = run.folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunLocked(f"{folder} is being trained by another erc-gym process") from None
    try:
        resolved = resolved_config(run)
        diffs = config_diff(folder, resolved)
        if diffs and not overwrite:
            raise ConfigMismatch(
                _mismatch_message(folder, diffs) + "; overwrite=True (--overwrite) starts it over"
            )
        if diffs:
            _clear(folder)
        if (folder / "done").exists():
            return folder
        _write_json_atomic(folder / "run.json", resolved)
        _write_config(folder, run)
        repair_jsonl(folder / "metrics.jsonl")  # a line cut short by a kill must not block resume
        start = time.perf_counter()
        if run.kind == "bandit":
            _run_bandit(run, folder, resume)
        elif run.kind == "sb3":
            _run_sb3(run, folder, resume)
        else:
            _run_llm(run, folder, resume)
        _write_config(folder, run)
        (folder / "done").write_text(f"{time.perf_counter() - start:.1f}\n")
        (folder / "error.log").unlink(missing_ok=True)
    finally:
        lock.release()
    return folder


def _stop_after() -> int | None:
    """Test hook: ``ERC_GYM_STOP_AFTER=N`` stops every run after N iterations / steps."""
    value = os.environ.get("ERC_GYM_STOP_AFTER")
    return int(value) if value else None


class _Interrupted(RuntimeError):
    """A run stopped early by ``ERC_GYM_STOP_AFTER`` (not marked done, resumable)."""


def _check_stopped(stop: int | None, total: int) -> None:
    if stop is not None and stop < total:
        raise _Interrupted(f"stopped after {stop} of {total} iterations")


def _run_bandit(run: RunSpec, folder: Path, resume: bool) -> None:
    from erc_gym.bandit import BanditConfig, train_bandit

    config = BanditConfig(**_trainer_settings(run))
    stop = _stop_after()
    train_bandit(config, folder, resume=resume, max_iterations=stop)
    _check_stopped(stop, config.iterations)


def _run_llm(run: RunSpec, folder: Path, resume: bool) -> None:
    from erc_gym.llm import ERCTrainer, TrainerConfig

    settings = {"device": "cpu", **_trainer_settings(run)}
    config = TrainerConfig(**settings, run_dir=str(folder.parent), name=folder.name, progress=False)
    stop = _stop_after()
    ERCTrainer(config).train(resume=resume, max_steps=stop)
    _check_stopped(stop, config.steps)


def _run_sb3(run: RunSpec, folder: Path, resume: bool) -> None:
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import VecNormalize

    from erc_gym.diagnostics import EntropyDynamicsCallback
    from erc_gym.sb3 import ERCPPO
    from erc_gym.sb3.jsonlog import StrictJSONOutputFormat
    from erc_gym.sb3.presets import make_env_kwargs, ppo_kwargs

    env_id = run.env["id"]
    resolved = _sb3_settings(run)
    total, eval_every = int(resolved["steps"]), int(resolved["eval_every"])
    eval_episodes = int(resolved["eval_episodes"])
    settings = {**run.settings, **{k: v for k, v in run.env.items() if k != "id"}}
    for key in ("steps", "eval_every", "eval_episodes"):
        settings.pop(key, None)
    env_kw = make_env_kwargs(env_id)
    ckpt = folder / "checkpoint.zip"
    norm_stats = folder / "vecnormalize.pkl"
    resuming = resume and ckpt.exists()
    env: Any = make_vec_env(env_id, n_envs=env_kw["n_envs"], seed=run.seed)
    eval_env: Any = make_vec_env(env_id, n_envs=1, seed=run.seed + 10_000)
    if env_kw["normalize"]:  # the zoo preset normalises observations (and rewards)
        if resuming and norm_stats.exists():
            env = VecNormalize.load(str(norm_stats), env)
        else:
            env = VecNormalize(env, gamma=ppo_kwargs(env_id).get("gamma", 0.99))
        # EvalCallback copies the training statistics into it before each evaluation
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False)

    def save() -> None:
        # write-then-rename: a kill mid-save leaves the previous checkpoint intact
        if isinstance(env, VecNormalize):
            env.save(str(folder / ".vecnormalize.tmp"))
            os.replace(folder / ".vecnormalize.tmp", norm_stats)
        model.save(folder / ".checkpoint.tmp.zip")
        os.replace(folder / ".checkpoint.tmp.zip", ckpt)

    band = run.erc
    algo_kwargs = {
        **_SB3_ALGO_KWARGS[run.algorithm],
        "erc_low": None if band is None else band[0],
        "erc_high": None if band is None else band[1],
    }
    metrics = folder / "metrics.jsonl"
    if resuming:
        model = ERCPPO.load(ckpt, env=env, device="cpu")
        done_steps = model.num_timesteps
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        keep = [ln for ln in lines if json.loads(ln).get("time/total_timesteps", 0) <= done_steps]
        metrics.write_text("".join(k + "\n" for k in keep))
    else:
        kwargs = ppo_kwargs(env_id, seed=run.seed, device="cpu", verbose=0, **settings)
        kwargs.pop("policy", None)
        model = ERCPPO("MlpPolicy", env, **kwargs, **algo_kwargs)
        metrics.unlink(missing_ok=True)
    model.set_logger(Logger(str(folder), [StrictJSONOutputFormat(metrics)]))
    stop_after = _stop_after()

    class Checkpoint(BaseCallback):
        """Saves the model every ``eval_every`` steps (and stops early for resume tests)."""

        def __init__(self) -> None:
            super().__init__()
            self.next_save = (model.num_timesteps // eval_every + 1) * eval_every

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next_save:
                save()
                self.next_save += eval_every
                if stop_after is not None and self.num_timesteps >= stop_after:
                    raise _Interrupted(f"stopped after {self.num_timesteps} steps")
            return True

    eval_cb = EvalCallback(
        eval_env,
        eval_freq=max(eval_every // env_kw["n_envs"], 1),
        n_eval_episodes=eval_episodes,
        deterministic=True,
        verbose=0,
    )
    band_for_diag = band if band is not None else (0.95, 1.05)
    callbacks = CallbackList([eval_cb, EntropyDynamicsCallback(band=band_for_diag), Checkpoint()])
    try:
        model.learn(
            total - model.num_timesteps,
            callback=callbacks,
            log_interval=1,
            reset_num_timesteps=False,
        )
    except _Interrupted:
        env.close()
        eval_env.close()
        raise
    eval_cb.eval_freq = 1  # a final evaluation at the end of the budget
    eval_cb.n_calls = 0
    eval_cb.on_step()  # logs and dumps, with the last update's train/* keys
    save()
    env.close()
    eval_env.close()


# ---------------------------------------------------------------------------------------------
# Progress within runs: the main process reads the last line of each running run's metrics.


def _budget(run: RunSpec) -> tuple[str, float]:
    """``(metrics key, total)`` of a run's progress counter."""
    trainer = resolved_config(run)["trainer"]
    if run.kind == "sb3":
        return "time/total_timesteps", float(trainer["steps"])
    if run.kind == "bandit":
        return "iteration", float(trainer["iterations"])
    return "step", float(trainer["steps"])


def _last_value(path: Path, key: str) -> float | None:
    """``key`` of the last complete line of ``path`` that has it (reads only the file's tail)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")[1:-1] if size > 65536 else tail.split(b"\n")[:-1]):
        try:
            value = json.loads(line).get(key)
        except (ValueError, AttributeError):
            continue
        if isinstance(value, int | float):
            return float(value)
    return None


class _Progress:
    """A tqdm bar over the grid in runs, moved by the fraction done of each running run."""

    def __init__(
        self, spec: dict[str, Any], runs: list[RunSpec], root: Path, finished: int
    ) -> None:
        from tqdm import tqdm

        self.root = root
        self.finished = finished
        self.budgets = {id(r): _budget(r) for r in runs}
        self.bar = tqdm(
            total=len(runs),
            initial=finished,
            desc=spec["name"],
            unit="run",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} runs "
            "[{elapsed}<{remaining}]",
            file=sys.stderr,
        )
        self.lock = threading.Lock()

    def refresh(self, running: list[RunSpec]) -> None:
        partial = 0.0
        for run in running:
            key, total = self.budgets[id(run)]
            value = _last_value(run.folder(self.root) / "metrics.jsonl", key)
            if value is not None and total > 0:
                partial += min(value / total, 0.99)
        with self.lock:
            n = round(self.finished + partial, 2)
            if n != self.bar.n:
                self.bar.n = n
                self.bar.refresh()

    def run_finished(self) -> None:
        with self.lock:
            self.finished += 1

    def write(self, message: str) -> None:
        with self.lock:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        with self.lock:
            self.bar.close()


def _say(progress: _Progress | None, message: str) -> None:
    if progress is not None:
        progress.write(message)
    else:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Worker processes that never outlive the main process.


def _die_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` ends, even if ``parent`` is SIGKILLed."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (linux/prctl.h)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return

    def watchdog() -> None:  # elsewhere: poll the parent (it is reparented when it dies)
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()


def _worker(run: RunSpec, root: str, resume: bool, overwrite: bool, conn: Any, parent: int) -> None:
    """Child process: one run; reports ``("done" | "locked" | "error", text)`` through ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(1)
    try:
        run_one(run, root, resume, overwrite)
        conn.send(("done", ""))
    except RunLocked as err:
        conn.send(("locked", str(err)))
    except Exception as err:
        text = traceback.format_exc()
        with contextlib.suppress(OSError):
            (run.folder(root) / "error.log").write_text(text)
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


@dataclass
class _Outcome:
    finished: list[RunSpec] = field(default_factory=list)
    locked: list[tuple[RunSpec, str]] = field(default_factory=list)
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    stopped: list[RunSpec] = field(default_factory=list)
    signum: int | None = None


@contextlib.contextmanager
def _handle_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Install ``handler`` for SIGINT and SIGTERM (main thread only), restore afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _mp_context() -> Any:
    """``fork`` (fast start), unless this process has initialised CUDA: then ``spawn``.

    A forked child cannot use a CUDA context made by its parent ("Cannot re-initialize CUDA in
    forked subprocess"). The runner itself never touches CUDA, so runs on a GPU (``device:
    "cuda"``) each initialise their own context in their child process and share the device;
    spawn covers callers that used CUDA before calling :func:`run_experiment`.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return mp.get_context("spawn")
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()


def _run_in_processes(
    todo: list[RunSpec],
    root: Path,
    resume: bool,
    overwrite: bool,
    workers: int,
    progress: _Progress | None,
) -> _Outcome:
    """Run ``todo`` in at most ``workers`` child processes; stop them all on SIGINT / SIGTERM."""
    ctx = _mp_context()
    out = _Outcome()
    pending = list(todo)
    active: dict[Any, tuple[RunSpec, Any]] = {}  # process -> (run, receiving end)
    forced = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal forced
        if out.signum is None:
            out.signum = signum
            _note_stop(signum)
            return
        forced = True  # a second Ctrl-C: no grace period
        for proc in list(active):
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)

    def reap(proc: Any) -> None:
        run, conn = active.pop(proc)
        proc.join()
        try:
            status, text = conn.recv() if conn.poll() else ("", "")
        except EOFError:  # killed before it could report
            status, text = "", ""
        conn.close()
        if not status:
            status, text = "error", f"worker ended with exit code {proc.exitcode}"
        if out.signum is not None and status == "error":
            out.stopped.append(run)
        elif status == "done":
            out.finished.append(run)
            if progress is not None:
                progress.run_finished()
        elif status == "locked":
            out.locked.append((run, text))
            _say(progress, f"skipped: {text}")
        else:
            out.failed.append((run, text))
            _say(progress, f"failed: {run.folder(root)}: {text} (traceback: error.log)")

    with _handle_signals(on_signal):
        while (pending or active) and out.signum is None:
            while pending and len(active) < workers:
                run = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker,
                    args=(run, str(root), resume, overwrite, send, os.getpid()),
                    name=f"erc-gym {run.variant}/{run.seed}",
                )
                proc.start()
                send.close()
                active[proc] = (run, recv)
            wait([p.sentinel for p in active], timeout=0.5)
            for proc in [p for p in active if not p.is_alive()]:
                reap(proc)
            if progress is not None:
                progress.refresh([r for r, _ in active.values()])
        if out.signum is not None:  # stop: SIGTERM, a short grace period, then SIGKILL
            for proc in active:
                with contextlib.suppress(OSError):
                    proc.terminate()
            deadline = time.monotonic() + _STOP_GRACE_S
            for proc in list(active):
                proc.join(timeout=0 if forced else max(deadline - time.monotonic(), 0))
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                reap(proc)
    return out


def _run_here(
    todo: list[RunSpec], root: Path, resume: bool, overwrite: bool, progress: _Progress | None
) -> _Outcome:
    """Run ``todo`` one after another in this process (``workers=1``: easy to debug)."""
    out = _Outcome()
    current: list[RunSpec] = []
    stop_polling = threading.Event()

    def poll() -> None:
        while not stop_polling.wait(0.5):
            if progress is not None:
                progress.refresh(list(current))

    def on_term(signum: int, frame: Any) -> None:
        raise _SigTerm()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    import torch

    # one torch thread, as in a worker process: a run's numbers and speed do not depend on
    # --workers (with the default thread count, CartPole runs took ~8x the CPU on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
        # Ctrl-C is a KeyboardInterrupt here whatever the caller had installed (the CLI ignores
        # signals that arrive after the runs, and this function restores its handlers)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for run in todo:
            current[:] = [run]
            try:
                run_one(run, root, resume, overwrite)
            except RunLocked as err:
                out.locked.append((run, str(err)))
                _say(progress, f"skipped: {err}")
                continue
            except KeyboardInterrupt as err:
                out.signum = signal.SIGTERM if isinstance(err, _SigTerm) else signal.SIGINT
                _note_stop(out.signum)
                out.stopped.append(run)
                break
            out.finished.append(run)
            if progress is not None:
                progress.run_finished()
    finally:
        stop_polling.set()
        current.clear()
        torch.set_num_threads(threads)
        if in_main:
            for signum, handler in old.items():
                signal.signal(signum, handler)
    return out


_stopped_by: int | None = None


def stopped_by() -> int | None:
    """The signal (SIGINT or SIGTERM) that stopped this process's last :func:`run_experiment`,
    or None. Lets a caller's own signal handler tell "the runs were stopped, we are leaving"
    from an ordinary signal."""
    return _stopped_by


def _note_stop(signum: int | None) -> None:
    global _stopped_by
    _stopped_by = signum


def run_experiment(
    name: str | dict[str, Any],
    root: str | Path = "runs",
    *,
    workers: int | None = None,
    resume: bool = True,
    progress: bool = True,
    seeds: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Run every unfinished run of an experiment; returns all run folders of the grid.

    Args:
        name: a shipped experiment name, a config path, or a config dict (checked against the
            schema either way).
        root: the runs folder.
        workers: parallel processes (default: the number of cores, at most the runs to do);
            ``1`` runs in this process.
        resume: resume unfinished runs from their checkpoints (False: restart them).
        progress: a tqdm bar over the grid (on stderr), moving within runs.
        seeds: override the config's number of seeds.
        overwrite: start over the runs whose folder holds another config (their outputs are
            deleted); otherwise such folders are refused before anything runs.

    Raises:
        ConfigError: the config does not fit the schema.
        ConfigMismatch: run folders of another config exist (and ``overwrite`` is False).
        ExperimentInterrupted: SIGINT or SIGTERM; unfinished runs resume on the next call.
        RunsFailed: runs raised (the others still ran); tracebacks in ``<run>/error.log``.
    """
    _note_stop(None)
    if isinstance(name, str):
        spec = load_experiment(name)
        if seeds is not None:
            spec = validate_experiment({**spec, "seeds": seeds}, name)
    else:
        raw = dict(name) if seeds is None else {**name, "seeds": seeds}
        spec = validate_experiment(raw, str(name.get("name", "config")))
    root = Path(root)
    runs = expand(spec)
    stale = [
        (r.folder(root), d) for r in runs if (d := config_diff(r.folder(root), resolved_config(r)))
    ]
    if stale and not overwrite:
        folder, diffs = stale[0]
        raise ConfigMismatch(
            f"{len(stale)} run folder(s) were made with another config, e.g. "
            f"{_mismatch_message(folder, diffs)}; --overwrite (overwrite=True) starts them over "
            "and deletes their outputs, or choose another runs folder"
        )
    (root / spec["name"]).mkdir(parents=True, exist_ok=True)
    _write_json_atomic(root / spec["name"] / "experiment.json", spec)
    restart = {f for f, _ in stale}
    todo = [r for r in runs if r.folder(root) in restart or not (r.folder(root) / "done").exists()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = _Progress(spec, runs, root, len(runs) - len(todo)) if progress else None
    try:
        if workers == 1:
            out = _run_here(todo, root, resume, overwrite, bar)
        else:
            out = _run_in_processes(todo, root, resume, overwrite, workers, bar)
    finally:
        if bar is not None:
            bar.close()
    if out.signum is not None:
        finished = sum((r.folder(root) / "done").exists() for r in runs)
        raise ExperimentInterrupted(
            out.signum, finished, len(runs), [r.folder(root) for r in out.stopped]
        )
    if out.locked:
        _say(
            None,
            f"{len(out.locked)} run(s) skipped: another erc-gym process holds them; run the "
            "same command again when it has finished to include them",
        )
    if out.failed:
        run, text = out.failed[0]
        raise RunsFailed(
            f"{len(out.failed)} of {len(todo)} runs failed, e.g. {run.folder(root)}: {text} "
            "(traceback in its error.log)"
        )
    return [r.folder(root) for r in runs]
