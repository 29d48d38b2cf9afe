"""Kind ``llm``: :class:`erc_gym.llm.ERCTrainer` on a causal LM
(settings: :class:`~erc_gym.llm.TrainerConfig`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from erc_gym.lab.kinds.base import TRAINER_SERIES, DataclassKind, check_stopped, grid_settings

if TYPE_CHECKING:
    from erc_gym.lab.grid import RunSpec

__all__ = ["KIND", "SERIES_FALLBACKS", "SERIES_KEYS", "WARM_START_FOLDER", "LLMKind"]

#: The folder of an experiment's runs folder where its runs keep their SFT warm starts
#: (``TrainerConfig.warm_start_cache``).
WARM_START_FOLDER = "warm_starts"


#: Common series name -> key in this kind's ``metrics.jsonl`` (see
#: :meth:`erc_gym.lab.analysis.Run.series`). The score is ``eval_score``, the mean held-out
#: accuracy of the run's last ``score_evals`` evaluations at each evaluation, so the last value
#: (the final score) is the mean of the last ``score_evals`` evaluations.
SERIES_KEYS = {
    **TRAINER_SERIES,
    "score": "eval_score",
    "accuracy": "eval_accuracy",
    "pass_at_k": "eval_pass_at_k",
    "sampled_accuracy": "eval_sampled_accuracy",
    "update_time": "time_train",
}
#: Keys read where a run's log has none of :data:`SERIES_KEYS`' (folders written before the
#: trainer logged ``eval_score``: their score is the last evaluation's accuracy).
SERIES_FALLBACKS = {"score": "eval_accuracy"}


class LLMKind(DataclassKind):
    """GRPO / DAPO / GPPO (+ERC) on a transformers causal LM (CPU unless ``device`` says)."""

    name = "llm"
    score_label = "held-out accuracy (greedy; mean of the last score_evals evaluations)"
    step_label = "RL steps"
    series_keys: Mapping[str, str] = SERIES_KEYS
    series_fallbacks: Mapping[str, str] = SERIES_FALLBACKS
    #: Trainer fields that the runner sets (the run folder, the progress display and the
    #: experiment's cache of SFT warm starts, which changes no result).
    runner_keys = frozenset({"run_dir", "name", "progress", "warm_start_cache"})
    #: The trainer's settings added after run folders were first recorded, at the values that
    #: reproduce those runs (see :class:`DataclassKind`).
    added_settings: ClassVar[dict[str, Any]] = {
        **DataclassKind.added_settings,
        "score_evals": 1,
        "eval_pass_k": 0,
    }

    def config_class(self) -> type:
        from erc_gym.llm.trainer import TrainerConfig

        return TrainerConfig

    def axis_settings(
        self, env: dict[str, Any], settings: dict[str, Any], point: dict[str, Any]
    ) -> dict[str, Any]:
        """``steps_per_rollout`` S -> ``mini_batch_prompts = P / S`` and one epoch for S <= P,
        else one prompt per mini-batch and ``epochs = S / P`` (P = ``prompts_per_step``,
        default 16); ``lr`` -> ``lr``."""
        out = dict(settings)
        steps = point.get("steps_per_rollout")
        if steps is not None:
            s = int(steps)
            prompts = int({**out, **env}.get("prompts_per_step", 16))
            if s <= prompts and prompts % s == 0:
                out["mini_batch_prompts"], out["epochs"] = prompts // s, 1
            elif s > prompts and s % prompts == 0:
                out["mini_batch_prompts"], out["epochs"] = 1, s // prompts
            else:
                raise ValueError(
                    f"axes.steps_per_rollout={s} must divide prompts_per_step={prompts} "
                    "or be a multiple of it"
                )
        if point.get("lr") is not None:
            out["lr"] = float(point["lr"])
        return out

    def trainer_config(self, run: RunSpec) -> dict[str, Any]:
        config = self.config_class()(**{"device": "cpu", **grid_settings(run)})
        trainer = dataclasses.asdict(config)
        for key in sorted(self.runner_keys):
            trainer.pop(key)
        return trainer

    def budget(self, trainer: dict[str, Any]) -> tuple[str, float]:
        return "step", float(trainer["steps"])

    def resources(self, trainer: dict[str, Any]) -> dict[str, float]:
        """One CPU, and one GPU for a run on ``cuda`` (a cluster launcher picks the device)."""
        if str(trainer.get("device", "cpu")).startswith("cuda"):
            return {"CPU": 1, "GPU": 1}
        return {"CPU": 1}

    def train(self, run: RunSpec, folder: Path, resume: bool, stop_after: int | None) -> None:
        from erc_gym.llm.trainer import ERCTrainer

        settings = {"device": "cpu", **grid_settings(run)}
        # runs of one experiment that share a seed share their warm start: trained once
        config = self.config_class()(
            **settings,
            run_dir=str(folder.parent),
            name=folder.name,
            progress=False,
            warm_start_cache=str(folder.parent.parent / WARM_START_FOLDER),
        )
        ERCTrainer(config).train(resume=resume, max_steps=stop_after)
        check_stopped(stop_after, config.steps)


KIND = LLMKind()
