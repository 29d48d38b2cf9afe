"""Experiment runner: a grid of algorithm x ERC band x environment x seed, in parallel processes.

An experiment is a small JSON file (see ``experiments/configs/``)::

    {
      "name": "quick",
      "kind": "bandit",                      # "sb3" (ERCPPO), "bandit" or "llm"
      "seeds": 3,
      "algorithms": ["ppo"],                 # any of "ppo", "dapo", "gppo"
      "erc": [null, [0.95, 1.05]],           # null = ERC off, [low, high] = a band
      "envs": [{"label": "V4096", "vocab_size": 4096}],
      "settings": {"iterations": 40},        # shared by every run
      "axes": {"steps_per_rollout": [2, 8], "lr": [0.05, 0.2]}   # optional stress grid
    }

``axes`` (optional) repeats the grid on every point of an off-policy stress map; see
:mod:`erc_gym.stress` for what each axis sets per kind. Variant names then end in ``-s<S>-lr<lr>``.

Every run writes ``runs/<experiment>/<variant>/<seed>/{config.json, metrics.jsonl}`` (the
variant name joins the env label, the algorithm and the band, e.g. ``V4096-ppo-erc0.95-1.05``)
and a ``done`` marker when it finishes. Running the experiment again skips finished runs and
resumes unfinished ones from their last checkpoint (``checkpoint.pt`` / ``checkpoint.zip``).

``kind`` chooses the trainer:

* ``sb3``: :class:`~erc_gym.sb3.ERCPPO` on a Gymnasium id (``envs[i]["id"]``) with the zoo preset
  of :mod:`erc_gym.sb3.presets`; ERC off is ERCPPO with ``erc_low=erc_high=None`` (identical to
  SB3 PPO). ``dapo`` adds ``clip_range_high=0.28`` and dual-clip 10, ``gppo`` the
  gradient-preserving clip with dual-clip 10. Presets with ``normalize`` get SB3's
  ``VecNormalize`` (its statistics are checkpointed too). Logged with SB3's JSON logger plus
  :class:`~erc_gym.diagnostics.EntropyDynamicsCallback` and periodic evaluations.
* ``bandit``: :func:`erc_gym.bandit.train_bandit` (settings: :class:`~erc_gym.bandit.BanditConfig`).
* ``llm``: :class:`erc_gym.llm.ERCTrainer` (settings: :class:`~erc_gym.llm.TrainerConfig`).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_DIR",
    "KINDS",
    "RunSpec",
    "expand",
    "find_experiment",
    "load_experiment",
    "run_experiment",
    "run_one",
]

#: Kinds of run the runner knows.
KINDS = ("sb3", "bandit", "llm")
#: Where the shipped experiment configs live.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"
ALGORITHMS = ("ppo", "dapo", "gppo")
_SB3_ALGO_KWARGS: dict[str, dict[str, Any]] = {
    "ppo": {},
    "dapo": {"clip_range_high": 0.28, "dual_clip": 10.0},
    "gppo": {"clip_variant": "gppo", "dual_clip": 10.0},
}


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


def find_experiment(name: str) -> Path:
    """Path of an experiment config: an existing file, or a name in :data:`CONFIG_DIR`."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name}.json"
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.json")) if CONFIG_DIR.is_dir() else []
    raise FileNotFoundError(
        f"no experiment {name!r}: not a file, and not one of the shipped configs {available}"
    )


def load_experiment(name: str) -> dict[str, Any]:
    """Read and check an experiment config (see the module docstring for the format)."""
    spec = json.loads(find_experiment(name).read_text())
    missing = [k for k in ("name", "kind", "algorithms", "envs") if k not in spec]
    if missing:
        raise ValueError(f"experiment config {name!r} lacks {missing}")
    if spec["kind"] not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {spec['kind']!r}")
    bad = [a for a in spec["algorithms"] if a not in ALGORITHMS]
    if bad:
        raise ValueError(f"unknown algorithms {bad}; choose from {ALGORITHMS}")
    for band in spec.get("erc", [None]):
        if band is not None and not (len(band) == 2 and 0 < band[0] < 1 < band[1]):
            raise ValueError(f"an ERC band must be [low, high] with 0 < low < 1 < high, got {band}")
    if not spec["envs"]:
        raise ValueError("envs must list at least one environment")
    if "axes" in spec:
        from erc_gym.stress import check_axes

        check_axes(spec["axes"])
    return dict(spec)


def _band_label(band: tuple[float, float] | None) -> str:
    return "" if band is None else f"-erc{band[0]:g}-{band[1]:g}"


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
    seeds = spec.get("seeds", 3)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    runs: list[RunSpec] = []
    for env in spec["envs"]:
        env = dict(env)
        label = env.pop("label", None) or env.get("id") or "env"
        for suffix, point, settings in _stress_points(spec, env):
            for algo in spec["algorithms"]:
                for band in spec.get("erc", [None]):
                    erc = None if band is None else (float(band[0]), float(band[1]))
                    variant = f"{label}-{algo}{_band_label(erc)}{suffix}"
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


def _write_config(folder: Path, run: RunSpec) -> None:
    """Merge the runner's record of the run into ``config.json`` (beside the trainer's keys)."""
    path = folder / "config.json"
    own = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**own, **run.meta()}, indent=2))


def run_one(run: RunSpec, root: str | Path, resume: bool = True) -> Path:
    """Train one run (resuming it when possible) and mark it done; returns its folder."""
    folder = run.folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    _write_config(folder, run)
    start = time.perf_counter()
    if run.kind == "bandit":
        _run_bandit(run, folder, resume)
    elif run.kind == "sb3":
        _run_sb3(run, folder, resume)
    elif run.kind == "llm":
        _run_llm(run, folder, resume)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {run.kind!r}")
    _write_config(folder, run)
    (folder / "done").write_text(f"{time.perf_counter() - start:.1f}\n")
    return folder


def _stop_after() -> int | None:
    """Test hook: ``ERC_GYM_STOP_AFTER=N`` stops every run after N iterations / steps."""
    value = os.environ.get("ERC_GYM_STOP_AFTER")
    return int(value) if value else None


class _Interrupted(RuntimeError):
    """A run stopped early by ``ERC_GYM_STOP_AFTER`` (not marked done, resumable)."""


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
    from erc_gym.sb3.presets import PRESETS, make_env_kwargs, ppo_kwargs

    env_id = run.env["id"]
    settings = {**run.settings, **{k: v for k, v in run.env.items() if k != "id"}}
    env_kw = make_env_kwargs(env_id)
    total = int(settings.pop("steps", 0) or PRESETS[env_id]["n_timesteps"])
    eval_every = int(settings.pop("eval_every", max(total // 10, 1)))
    eval_episodes = int(settings.pop("eval_episodes", 10))
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
        model.save(ckpt)
        if isinstance(env, VecNormalize):
            env.save(str(norm_stats))

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
    model.set_logger(Logger(str(folder), [_append_json(str(metrics))]))
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


def _append_json(filename: str) -> Any:
    """SB3's JSON output format, appending to an existing file (SB3's own truncates it)."""
    from stable_baselines3.common.logger import JSONOutputFormat

    class AppendJSON(JSONOutputFormat):
        def __init__(self, filename: str) -> None:
            self.file = open(filename, "a")  # noqa: SIM115 (closed by Logger.close)

    return AppendJSON(filename)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_experiment(
    name: str | dict[str, Any],
    root: str | Path = "runs",
    *,
    workers: int | None = None,
    resume: bool = True,
    progress: bool = True,
    seeds: int | None = None,
) -> list[Path]:
    """Run every unfinished run of an experiment; returns all run folders of the grid.

    Args:
        name: a shipped experiment name, a config path, or an already loaded config dict.
        root: the runs folder.
        workers: parallel processes (default: the number of cores, at most the runs to do);
            ``1`` runs in this process.
        resume: resume unfinished runs from their checkpoints (False: restart them).
        progress: a tqdm bar over the grid.
        seeds: override the config's number of seeds.
    """
    spec = load_experiment(name) if isinstance(name, str) else dict(name)
    if seeds is not None:
        spec["seeds"] = seeds
    root = Path(root)
    runs = expand(spec)
    (root / spec["name"]).mkdir(parents=True, exist_ok=True)
    (root / spec["name"] / "experiment.json").write_text(json.dumps(spec, indent=2))
    todo = [r for r in runs if not (r.folder(root) / "done").exists()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=spec["name"], unit="run")
    try:
        if workers == 1:
            for run in todo:
                run_one(run, root, resume)
                if bar is not None:
                    bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
                futures = [pool.submit(run_one, run, str(root), resume) for run in todo]
                for fut in as_completed(futures):
                    fut.result()
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [r.folder(root) for r in runs]
