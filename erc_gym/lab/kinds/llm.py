"""Kind ``llm``: :class:`erc_gym.llm.ERCTrainer` on a causal LM
(settings: :class:`~erc_gym.llm.TrainerConfig`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erc_gym.lab.kinds.base import TRAINER_SERIES, DataclassKind, check_stopped, grid_settings

if TYPE_CHECKING:
    from erc_gym.lab.grid import RunSpec

__all__ = ["KIND", "SERIES_KEYS", "LLMKind"]


#: Common series name -> key in this kind's ``metrics.jsonl`` (see
#: :meth:`erc_gym.lab.analysis.Run.series`).
SERIES_KEYS = {**TRAINER_SERIES, "score": "eval_accuracy"}


class LLMKind(DataclassKind):
    """GRPO / DAPO / GPPO (+ERC) on a transformers causal LM (CPU unless ``device`` says)."""

    name = "llm"
    score_label = "held-out accuracy (greedy)"
    step_label = "RL steps"
    series_keys: Mapping[str, str] = SERIES_KEYS
    #: Trainer fields that the runner sets (the run folder and the progress display).
    runner_keys = frozenset({"run_dir", "name", "progress"})

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
        config = self.config_class()(
            **settings, run_dir=str(folder.parent), name=folder.name, progress=False
        )
        ERCTrainer(config).train(resume=resume, max_steps=stop_after)
        check_stopped(stop_after, config.steps)


KIND = LLMKind()
