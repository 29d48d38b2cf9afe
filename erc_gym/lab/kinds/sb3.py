"""Kind ``sb3``: :class:`~erc_gym.sb3.ERCPPO` on a Gymnasium id with the zoo preset of
:mod:`erc_gym.sb3.presets`.

ERC off is ERCPPO with ``erc_low=erc_high=None`` (identical to SB3 PPO); the algorithm adds its
recipe's ERCPPO arguments (:func:`erc_gym.losses.sb3_recipe_kwargs`: ``dapo`` clip-higher and
dual-clip, ``gppo`` the gradient-preserving clip with dual-clip). Presets with ``normalize`` get
SB3's ``VecNormalize`` (its statistics are checkpointed too). Logged in strict JSON
(:class:`~erc_gym.sb3.jsonlog.StrictJSONOutputFormat`) plus
:class:`~erc_gym.sb3.EntropyDynamicsCallback` and periodic evaluations. Besides ERCPPO's
arguments a run takes ``steps`` (default: the preset's), ``eval_every`` (default: a tenth of the
steps) and ``eval_episodes`` (default 10).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model

from erc_gym.atomic import atomic_write
from erc_gym.diagnostics import CLIPPING_FILE
from erc_gym.jsonl import truncate_metrics
from erc_gym.lab.kinds.base import StopRun
from erc_gym.losses import DPPO_VARIANTS, METHOD_METRIC_KEYS, sb3_recipe_kwargs

if TYPE_CHECKING:
    from erc_gym.lab.grid import RunSpec

__all__ = ["KIND", "SERIES_KEYS", "SB3Kind"]

#: The runner's own keys of an sb3 run (the rest go to ERCPPO).
RUNNER_KEYS = ("steps", "eval_every", "eval_episodes")
#: ERCPPO arguments that the runner or the grid sets.
_FIXED = {"self", "policy", "env", "args", "kwargs", "_init_setup_model", "seed"}
_FIXED |= {"device", "verbose", "erc_low", "erc_high"}


@cache
def _settings_model() -> type[BaseModel]:
    from stable_baselines3 import PPO

    from erc_gym.sb3 import ERCPPO
    from erc_gym.sb3.ppo import METHOD_KWARGS

    names = set(inspect.signature(PPO.__init__).parameters)
    names |= set(inspect.signature(ERCPPO.__init__).parameters) | set(METHOD_KWARGS)
    fields: dict[str, Any] = {name: (Any, None) for name in sorted(names - _FIXED)}
    positive = Annotated[StrictInt, Field(gt=0)]
    fields |= {"id": (str, ...), **{k: (positive | None, None) for k in sorted(RUNNER_KEYS)}}
    return create_model("SB3Settings", __config__=ConfigDict(extra="forbid"), **fields)


#: Common series name -> key in this kind's ``metrics.jsonl`` (see
#: :meth:`erc_gym.lab.analysis.Run.series`).
SERIES_KEYS = {
    "step": "time/total_timesteps",
    "score": "eval/mean_reward",
    "entropy": "train/entropy",
    "erc_clip_fraction": "train/erc_clip_fraction",
    "erc_clip_off_policy": "train/erc_clip_fraction_off_policy",
    "clip_fraction": "train/clip_fraction",
    "grad_norm": "train/grad_norm",
    "tv_unsampled": "diagnostics/tv_unsampled",
    "ratio_hist": "diagnostics/entropy_ratio_hist",
    "entropy_old_clipped": "diagnostics/erc_clipped_entropy_old",
    "entropy_old_kept": "diagnostics/erc_kept_entropy_old",
    "erc_low": "train/erc_low",
    "erc_high": "train/erc_high",
    "update_steps": "train/update_steps",
    "update_time": "time/train_seconds",
    **{key: f"train/{key}" for key in METHOD_METRIC_KEYS},
}


class SB3Kind:
    """ERCPPO with the zoo presets, evaluated deterministically."""

    name = "sb3"
    score_label = "evaluation return (deterministic)"
    step_label = "environment steps"
    series_keys: Mapping[str, str] = SERIES_KEYS

    def settings_model(self) -> type[BaseModel]:
        """ERCPPO's and SB3 PPO's arguments (SB3 checks their values), the Gymnasium ``id`` and
        the runner's ``steps``, ``eval_every``, ``eval_episodes``."""
        return _settings_model()

    def check(
        self, settings: dict[str, Any], algorithms: Sequence[str], bands: Sequence[Any]
    ) -> None:
        """A preset exists for the id; ``erc_target_clip_fraction`` and the rival methods'
        settings fit every band (ERCPPO checks them only when a run starts)."""
        from erc_gym.adaptive_band import check_target_clip_fraction
        from erc_gym.methods import MethodSettings
        from erc_gym.sb3.presets import PRESETS

        if settings["id"] not in PRESETS:
            raise ValueError(
                f"id = {settings['id']!r}: no preset for it; choose from {sorted(PRESETS)}"
            )
        fields = {f: settings[f] for f in MethodSettings.__dataclass_fields__ if f in settings}
        for band in bands:
            low, high = band if band is not None else (None, None)
            check_target_clip_fraction(settings.get("erc_target_clip_fraction"), low, high)
            MethodSettings(**fields).check_methods(erc_on=band is not None)

    def axis_settings(
        self, env: dict[str, Any], settings: dict[str, Any], point: dict[str, Any]
    ) -> dict[str, Any]:
        """``steps_per_rollout`` S -> the whole rollout (``n_envs x n_steps``) is one mini-batch
        and ``n_epochs = S``; ``lr`` -> a constant ``learning_rate``."""
        from erc_gym.sb3.presets import PRESETS

        out = dict(settings)
        if point.get("steps_per_rollout") is not None:
            preset = PRESETS[env["id"]]
            n_steps = int({**preset, **out, **env}.get("n_steps", 2048))
            out["batch_size"] = n_steps * int(preset["n_envs"])
            out["n_epochs"] = int(point["steps_per_rollout"])
        if point.get("lr") is not None:
            out["learning_rate"] = float(point["lr"])
        return out

    def trainer_config(self, run: RunSpec) -> dict[str, Any]:
        """The zoo preset, then the config's settings, with the runner's keys filled."""
        from erc_gym.sb3.presets import PRESETS

        env_id = run.env["id"]
        preset = {k: v for k, v in PRESETS[env_id].items() if k != "reference"}
        own = {**run.settings, **{k: v for k, v in run.env.items() if k != "id"}}
        steps = int(own.pop("steps", None) or preset["n_timesteps"])
        out = {**preset, **own, "id": env_id, "steps": steps}
        out.setdefault("eval_every", max(steps // 10, 1))
        out.setdefault("eval_episodes", 10)
        return {**out, **_recipe_kwargs(run.algorithm, own), "seed": run.seed}

    def budget(self, trainer: dict[str, Any]) -> tuple[str, float]:
        return "time/total_timesteps", float(trainer["steps"])

    def resources(self, trainer: dict[str, Any]) -> dict[str, float]:
        """One CPU (runs train on the CPU, their envs in the same process)."""
        return {"CPU": 1}

    def train(self, run: RunSpec, folder: Path, resume: bool, stop_after: int | None) -> None:
        _train(self.trainer_config(run), run, folder, resume, stop_after)


def _recipe_kwargs(algorithm: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ERCPPO arguments (:func:`erc_gym.losses.sb3_recipe_kwargs`) but those the
    run's settings give: a method's ``clip_variant`` (KL-Cov's ``none``, DPPO's) replaces the
    recipe's clip, and its dual-clip with it where the variant takes none, as in every trainer
    (:meth:`erc_gym.methods.MethodSettings.apply_to`)."""
    drop = set(settings)
    if settings.get("clip_variant") in ("none", *DPPO_VARIANTS):
        drop.add("dual_clip")
    return {k: v for k, v in sb3_recipe_kwargs(algorithm).items() if k not in drop}


def _train(
    resolved: dict[str, Any], run: RunSpec, folder: Path, resume: bool, stop_after: int | None
) -> None:
    """Train (or resume) one ERCPPO run in ``folder``, checkpointing every ``eval_every`` steps."""
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import VecNormalize

    from erc_gym.sb3 import ERCPPO, EntropyDynamicsCallback
    from erc_gym.sb3.jsonlog import StrictJSONOutputFormat
    from erc_gym.sb3.presets import make_env_kwargs, ppo_kwargs

    env_id = run.env["id"]
    total, eval_every = int(resolved["steps"]), int(resolved["eval_every"])
    eval_episodes = int(resolved["eval_episodes"])
    settings = {**run.settings, **{k: v for k, v in run.env.items() if k != "id"}}
    for key in RUNNER_KEYS:
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
        # a kill mid-save leaves the previous checkpoint (and statistics) intact
        if isinstance(env, VecNormalize):
            atomic_write(norm_stats, lambda tmp: env.save(str(tmp)))
        atomic_write(ckpt, model.save)

    band = run.erc
    algo_kwargs = {
        **_recipe_kwargs(run.algorithm, settings),
        "erc_low": None if band is None else band[0],
        "erc_high": None if band is None else band[1],
    }
    metrics = folder / "metrics.jsonl"
    clipping = folder / CLIPPING_FILE
    if resuming:
        model = ERCPPO.load(ckpt, env=env, device="cpu")
        truncate_metrics(metrics, "time/total_timesteps", model.num_timesteps)
        truncate_metrics(clipping, "time/total_timesteps", model.num_timesteps)
    else:
        kwargs = ppo_kwargs(env_id, seed=run.seed, device="cpu", verbose=0, **settings)
        kwargs.pop("policy", None)
        model = ERCPPO("MlpPolicy", env, **kwargs, **algo_kwargs)
        metrics.unlink(missing_ok=True)
        clipping.unlink(missing_ok=True)
    model.set_logger(Logger(str(folder), [StrictJSONOutputFormat(metrics)]))

    class Checkpoint(BaseCallback):
        """Saves the model every ``eval_every`` steps (and stops at ``stop_after``)."""

        def __init__(self) -> None:
            super().__init__()
            self.next_save = (model.num_timesteps // eval_every + 1) * eval_every

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next_save:
                save()
                self.next_save += eval_every
                if stop_after is not None and self.num_timesteps >= stop_after:
                    raise StopRun(f"stopped after {self.num_timesteps} steps")
            return True

    eval_cb = EvalCallback(
        eval_env,
        eval_freq=max(eval_every // env_kw["n_envs"], 1),
        n_eval_episodes=eval_episodes,
        deterministic=True,
        verbose=0,
    )
    band_for_diag = band if band is not None else (0.95, 1.05)
    diagnostics = EntropyDynamicsCallback(band=band_for_diag, clipping_path=clipping)
    callbacks = CallbackList([eval_cb, diagnostics, Checkpoint()])
    try:
        model.learn(
            total - model.num_timesteps,
            callback=callbacks,
            log_interval=1,
            reset_num_timesteps=False,
        )
    except StopRun:
        env.close()
        eval_env.close()
        raise
    eval_cb.eval_freq = 1  # a final evaluation at the end of the budget
    eval_cb.n_calls = 0
    eval_cb.on_step()  # logs and dumps, with the last update's train/* keys
    save()
    env.close()
    eval_env.close()


KIND = SB3Kind()
