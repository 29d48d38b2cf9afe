"""Kind ``bandit``: :func:`erc_gym.bandit.train_bandit` on a VocabBandit
(settings: :class:`~erc_gym.bandit.BanditConfig`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from erc_gym.lab.kinds.base import TRAINER_SERIES, DataclassKind, check_stopped, grid_settings

if TYPE_CHECKING:
    from erc_gym.lab.grid import RunSpec

__all__ = ["KIND", "SERIES_KEYS", "BanditKind"]


#: Common series name -> key in this kind's ``metrics.jsonl`` (see
#: :meth:`erc_gym.lab.analysis.Run.series`).
SERIES_KEYS = {
    **TRAINER_SERIES,
    "score": "expected_reward",
    "tv_unsampled": "tv_unsampled",
    "update_time": "time_update",
}


class BanditKind(DataclassKind):
    """The softmax policy on a large-vocabulary bandit, trained group-relatively."""

    name = "bandit"
    score_label = "expected reward (exact)"
    step_label = "samples"
    series_keys: Mapping[str, str] = SERIES_KEYS
    #: Settings added after run folders were first recorded (left out of ``run.json`` at these
    #: defaults): the rival methods and ``log_time``.
    added_settings: ClassVar[dict[str, Any]] = {**DataclassKind.added_settings, "log_time": False}

    def config_class(self) -> type:
        from erc_gym.bandit import BanditConfig

        return BanditConfig

    def axis_settings(
        self, env: dict[str, Any], settings: dict[str, Any], point: dict[str, Any]
    ) -> dict[str, Any]:
        """``steps_per_rollout`` -> ``minibatches``, ``lr`` -> ``lr``."""
        out = dict(settings)
        if point.get("steps_per_rollout") is not None:
            out["minibatches"] = int(point["steps_per_rollout"])
        if point.get("lr") is not None:
            out["lr"] = float(point["lr"])
        return out

    def trainer_config(self, run: RunSpec) -> dict[str, Any]:
        return dataclasses.asdict(self.config_class()(**grid_settings(run)))

    def budget(self, trainer: dict[str, Any]) -> tuple[str, float]:
        return "iteration", float(trainer["iterations"])

    def train(self, run: RunSpec, folder: Path, resume: bool, stop_after: int | None) -> None:
        from erc_gym.bandit import train_bandit

        config = self.config_class()(**grid_settings(run))
        train_bandit(config, folder, resume=resume, max_iterations=stop_after)
        check_stopped(stop_after, config.iterations)


KIND = BanditKind()
