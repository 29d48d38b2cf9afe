"""What a trainer kind is: the :class:`Kind` protocol, and what the built-in kinds share.

A kind (``bandit``, ``sb3``, ``llm``, ...) is everything the experiment tooling needs to know about
one trainer: the settings a run accepts and their checks, how a stress-grid point translates into
those settings, the resolved config recorded in ``run.json``, the progress counter, the labels
and metric keys of its figures, and the driver that trains one run folder. The grid, the runner,
the schema and the analysis ask the kind; none of them switches on its name.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, create_model

from erc_gym.losses import METHOD_METRIC_KEYS
from erc_gym.methods import method_defaults

if TYPE_CHECKING:
    from erc_gym.lab.grid import RunSpec

__all__ = [
    "GRID_KEYS",
    "TRAINER_SERIES",
    "DataclassKind",
    "Kind",
    "StopRun",
    "check_stopped",
    "grid_settings",
]

#: Trainer settings that the grid itself sets for every run (a config may not set them).
GRID_KEYS = frozenset({"loss", "erc_low", "erc_high", "seed"})

#: Series that the bandit and the LLM trainer log under the names of
#: :func:`erc_gym.losses.loss_metrics` and of their own step counter (see ``Kind.series_keys``).
TRAINER_SERIES = {
    "step": "step",
    "entropy": "entropy",
    "erc_clip_fraction": "erc_clip_fraction",
    "erc_clip_off_policy": "erc_clip_fraction_off_policy",
    "clip_fraction": "clip_fraction",
    "grad_norm": "grad_norm",
    "ratio_hist": "entropy_ratio_hist",
    "entropy_old_clipped": "erc_clipped_entropy_old_mean",
    "entropy_old_kept": "erc_kept_entropy_old_mean",
    "erc_low": "erc_low",
    "erc_high": "erc_high",
    "update_steps": "update_steps",
    # the rival methods' keys (the share of tokens each acted on, coefficients, the KL)
    **{key: key for key in METHOD_METRIC_KEYS},
}


class StopRun(RuntimeError):
    """A run stopped early by the runner's ``stop_after`` (not marked done, resumable)."""


def check_stopped(stop_after: int | None, total: int) -> None:
    """Raise :class:`StopRun` when a driver stopped at ``stop_after`` before its ``total``."""
    if stop_after is not None and stop_after < total:
        raise StopRun(f"stopped after {stop_after} of {total} iterations")


class Kind(Protocol):
    """One trainer as the experiment tooling sees it (one module under ``erc_gym/lab/kinds``).

    Attributes:
        name: the config's ``kind``.
        score_label: y-axis label of the score in figures and reports.
        step_label: x-axis label of the training progress.
        series_keys: common series name (``step``, ``score``, ``entropy``, ``erc_clip_fraction``,
            ...; see :func:`erc_gym.lab.analysis.Run.series`) -> key in its ``metrics.jsonl``.
            A kind may also set ``series_fallbacks`` (same shape, optional): the key read for
            a series in a log that has none of ``series_keys``' key (an older run folder).
    """

    name: str
    score_label: str
    step_label: str
    series_keys: Mapping[str, str]

    def settings_model(self) -> type[BaseModel]:
        """A strict pydantic model of the settings a run accepts (config ``settings`` merged with
        an env's own keys)."""
        ...

    def check(
        self, settings: dict[str, Any], algorithms: Sequence[str], bands: Sequence[Any]
    ) -> None:
        """The trainer's own checks of a config's settings for every algorithm and band (after
        :meth:`settings_model`); raise ``ValueError`` with a one-line message."""
        ...

    def axis_settings(
        self, env: dict[str, Any], settings: dict[str, Any], point: dict[str, Any]
    ) -> dict[str, Any]:
        """``settings`` with the stress point ``point`` applied (see :mod:`erc_gym.lab.grid`)."""
        ...

    def trainer_config(self, run: RunSpec) -> dict[str, Any]:
        """Every trainer setting of ``run``, defaults included (``run.json``'s ``trainer``)."""
        ...

    def budget(self, trainer: dict[str, Any]) -> tuple[str, float]:
        """``(metrics key, total)`` of the progress counter of a run with these settings."""
        ...

    def resources(self, trainer: dict[str, Any]) -> dict[str, float]:
        """What one run with these settings (``run.json``'s ``trainer``) takes on a cluster, in
        Ray's resource names (``{"CPU": 1}``, ``{"CPU": 1, "GPU": 1}``); a config's
        ``resources`` overrides it (docs/cluster.md)."""
        ...

    def train(self, run: RunSpec, folder: Path, resume: bool, stop_after: int | None) -> None:
        """Train ``run`` in ``folder`` (resuming from its checkpoint when ``resume``); with
        ``stop_after``, stop after that many iterations or steps and raise :class:`StopRun`."""
        ...


def grid_settings(run: RunSpec) -> dict[str, Any]:
    """Trainer settings of a run: shared, then env-specific, then what the grid sets."""
    low, high = run.erc if run.erc is not None else (None, None)
    return {
        **run.settings,
        **run.env,
        "loss": run.algorithm,
        "erc_low": low,
        "erc_high": high,
        "seed": run.seed,
    }


@cache
def _dataclass_model(cls: type, skip: frozenset[str]) -> type[BaseModel]:
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {
        f.name: (hints[f.name], None) for f in dataclasses.fields(cls) if f.name not in skip
    }
    return create_model(
        f"{cls.__name__}Settings", __config__=ConfigDict(extra="forbid", strict=True), **fields
    )


class DataclassKind:
    """A kind whose trainer takes one dataclass config with ``validate()`` (bandit, llm).

    Subclasses set :attr:`runner_keys` and implement :meth:`config_class`.
    """

    #: Config fields that the runner sets (the run folder, the progress display).
    runner_keys: ClassVar[frozenset[str]] = frozenset()
    #: Config fields added after run folders were first recorded, with the default that
    #: reproduces the older runs (the rival methods, all off): ``run.json`` leaves them out at
    #: that default, so those folders still match and resume.
    added_settings: ClassVar[dict[str, Any]] = method_defaults()

    def config_class(self) -> type:
        """The trainer's config dataclass."""
        raise NotImplementedError

    def settings_model(self) -> type[BaseModel]:
        """Every field of the config dataclass but the grid's and the runner's, with its type."""
        return _dataclass_model(self.config_class(), GRID_KEYS | self.runner_keys)

    def resources(self, trainer: dict[str, Any]) -> dict[str, float]:
        """One CPU (the runner gives a run one torch thread)."""
        return {"CPU": 1}

    def check(
        self, settings: dict[str, Any], algorithms: Sequence[str], bands: Sequence[Any]
    ) -> None:
        """The config's ``validate()`` for every algorithm and band of the grid."""
        cls = self.config_class()
        for algo in algorithms:
            for band in bands:
                low, high = band if band is not None else (None, None)
                cls(**{**settings, "loss": algo, "erc_low": low, "erc_high": high}).validate()
