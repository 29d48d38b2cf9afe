"""The schema of experiment config files, checked before any run starts.

An experiment config (see :mod:`erc_gym.runner`) is validated with pydantic in two passes:

1. the file's own shape (:class:`ExperimentConfig`): no unknown top-level keys, integer seeds
   (a count from 1 to :data:`MAX_SEEDS` or a list of distinct seeds from 0 to :data:`MAX_SEED`),
   non-empty lists of known algorithms and environments, ERC bands ``[low, high]`` with
   ``0 < low < 1 < high``, distinct env labels;
2. the settings each run's trainer receives (``settings`` merged with an env's own keys): only
   keys the trainer knows (:class:`~erc_gym.bandit.BanditConfig`,
   :class:`~erc_gym.llm.TrainerConfig`, or ERCPPO's arguments plus the runner's ``steps``,
   ``eval_every``, ``eval_episodes`` for ``sb3``), with the trainer's types and its own range
   checks (``validate()``).

Errors become one :class:`ConfigError` (a ``ValueError``) whose message names the key and the
value, e.g. ``seeds = '12': Input should be a valid integer``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    create_model,
    model_validator,
)

__all__ = [
    "ALGORITHMS",
    "KINDS",
    "MAX_SEED",
    "MAX_SEEDS",
    "ConfigError",
    "ExperimentConfig",
    "validate_experiment",
]

#: Kinds of run the runner knows.
KINDS = ("sb3", "bandit", "llm")
#: Algorithms of the grid (the clip variant of the shared loss).
ALGORITHMS = ("ppo", "dapo", "gppo")
#: Trainer fields that the grid itself sets for every run (not allowed in settings).
_GRID_KEYS = {"loss", "erc_low", "erc_high", "seed"}
#: LLM trainer fields that the runner sets (the run folder and the progress display).
_LLM_RUNNER_KEYS = {"run_dir", "name", "progress"}
#: The runner's own keys of an sb3 run (the rest go to ERCPPO).
_SB3_RUNNER_KEYS = {"steps", "eval_every", "eval_episodes"}
_SB3_FIXED = {"self", "policy", "env", "args", "kwargs", "_init_setup_model", "seed"}
_SB3_FIXED |= {"device", "verbose", "erc_low", "erc_high"}


#: Most seeds a grid may ask for by count (a typo such as ``--seeds 30000000`` must not start
#: expanding millions of runs).
MAX_SEEDS = 1000
#: Largest seed: the runner derives other seeds from it (an sb3 run's evaluation env uses
#: ``seed + 10000`` plus the env index), and numpy takes seeds below ``2**32``.
MAX_SEED = 2**31 - 1


class ConfigError(ValueError):
    """An experiment config that does not fit the schema (the message is one line)."""


Band = tuple[StrictFloat, StrictFloat]


class EnvEntry(BaseModel):
    """One environment of the grid: a ``label`` (names its run folders) and trainer keys."""

    model_config = ConfigDict(extra="allow")

    label: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.+=-]+$")] | None = None
    """Run-folder name of the env (default: the sb3 ``id``, else ``env``)."""

    def kwargs(self) -> dict[str, Any]:
        """The env's own settings (everything but the label)."""
        return dict(self.model_extra or {})

    def resolved_label(self) -> str:
        """The label used in variant names."""
        return self.label or str(self.kwargs().get("id") or "env")


class ExperimentConfig(BaseModel):
    """An experiment config file (see :mod:`erc_gym.runner` for the meaning of each key)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.+=-]+$")]
    """Experiment name: the folder ``<runs>/<name>``."""
    description: str = ""
    """Free text shown at the top of the report."""
    kind: Literal["sb3", "bandit", "llm"]
    """Which trainer runs the grid."""
    seeds: (
        Annotated[StrictInt, Field(ge=1, le=MAX_SEEDS)]
        | Annotated[list[Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]], Field(min_length=1)]
    ) = 3
    """A number of seeds (0 .. n-1, at most :data:`MAX_SEEDS`) or an explicit list of seeds
    (each at most :data:`MAX_SEED`)."""
    algorithms: Annotated[list[Literal["ppo", "dapo", "gppo"]], Field(min_length=1)]
    """Clip variants of the grid."""
    erc: Annotated[list[Band | None], Field(min_length=1)] = [None]
    """ERC bands of the grid; ``null`` is ERC off."""
    envs: Annotated[list[EnvEntry], Field(min_length=1)]
    """Environments of the grid."""
    settings: dict[str, Any] = {}
    """Trainer settings shared by every run (an env's own keys override them)."""
    axes: dict[str, Any] | None = None
    """Optional off-policy stress grid, e.g. ``{"steps_per_rollout": [1, 8], "lr": [...]}``
    (:mod:`erc_gym.stress`)."""
    baseline: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.+=-]+$")] | None = None
    """Optional name of another experiment in the same runs folder whose stress-map runs the
    report adds, e.g. the fixed band that an adaptive band (``erc_target_clip_fraction``) is
    compared with (:func:`erc_gym.stress.band_rule_table`)."""

    @model_validator(mode="after")
    def _check_grid(self) -> ExperimentConfig:
        if self.baseline == self.name:
            raise ValueError(f"baseline = {self.baseline!r}: an experiment is not its own baseline")
        if self.axes is not None:
            from erc_gym.stress import check_axes

            check_axes(self.axes)
        for i, band in enumerate(self.erc):
            if band is not None and not 0 < band[0] < 1 < band[1]:
                raise ValueError(
                    f"erc[{i}] = {list(band)}: an ERC band is [low, high] with 0 < low < 1 < high"
                )
        grid: list[tuple[str, list[Any]]] = [
            ("erc", [tuple(b) if b else None for b in self.erc]),
            ("algorithms", list(self.algorithms)),
            ("seeds", self.seeds if isinstance(self.seeds, list) else []),
            ("envs labels", [e.resolved_label() for e in self.envs]),
        ]
        for key, values in grid:
            dup = sorted({str(v) for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"{key}: duplicate {', '.join(dup)} (each names run folders)")
        return self


def _trainer_model(kind: str) -> type[BaseModel]:
    """A strict pydantic model of the settings a run of ``kind`` accepts."""
    fields: dict[str, Any] = {}
    if kind == "sb3":
        from stable_baselines3 import PPO

        from erc_gym.sb3 import ERCPPO

        names = set(inspect.signature(PPO.__init__).parameters)
        names |= set(inspect.signature(ERCPPO.__init__).parameters)
        for name in sorted(names - _SB3_FIXED):
            fields[name] = (Any, None)  # SB3 checks these itself
        positive = Annotated[StrictInt, Field(gt=0)]
        fields |= {"id": (str, ...), **{k: (positive | None, None) for k in _SB3_RUNNER_KEYS}}
        return create_model("SB3Settings", __config__=ConfigDict(extra="forbid"), **fields)
    cls = _trainer_class(kind)
    hints = typing.get_type_hints(cls)
    skip = _GRID_KEYS | (_LLM_RUNNER_KEYS if kind == "llm" else set())
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            fields[f.name] = (hints[f.name], None)
    return create_model(
        f"{cls.__name__}Settings", __config__=ConfigDict(extra="forbid", strict=True), **fields
    )


def _trainer_class(kind: str) -> Any:
    if kind == "bandit":
        from erc_gym.bandit import BanditConfig

        return BanditConfig
    from erc_gym.llm.trainer import TrainerConfig

    return TrainerConfig


def _describe(err: ValidationError, known: list[str], prefix: str = "") -> str:
    """One line: the first error's key path, its value and the reason (+ how many more)."""
    errors = err.errors(include_url=False)
    # of a union (``seeds``: a count or a list), report the member the value has the type of:
    # its range error, not "Input should be a valid integer" from the other member
    first = min(errors, key=lambda e: str(e["type"]).endswith("_type"))
    locs = {_loc(e["loc"]) for e in errors}
    loc = _loc(first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc.split(".")[-1], known, n=1)
        msg = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if first["type"] == "value_error" and not loc:  # a model-level check: the message says it
        text = msg
    elif first["type"] == "missing":
        text = f"{loc}: missing"
    else:
        text = f"{loc} = {first.get('input')!r}: {msg}"
    text = f"{prefix}: {text}" if prefix else text
    return text + (f" (and {len(locs) - 1} more)" if len(locs) > 1 else "")


def _loc(parts: tuple[Any, ...]) -> str:
    """``('erc', 0, 'tuple[...]', 1)`` -> ``erc[0][1]`` (union member tags dropped)."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _is_union_tag(p):
            out += f".{p}" if out else str(p)
    return out


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member it tried (``int``, ``list[...]``): not a config key."""
    return isinstance(part, str) and (
        part.startswith(("constrained-", "list[", "tuple[", "function-", "nullable["))
        or part in ("int", "float", "str", "none")
    )


def validate_experiment(raw: Any, source: str = "config") -> dict[str, Any]:
    """Check an experiment config (a parsed JSON object) and return it with defaults filled.

    Args:
        raw: the parsed config file.
        source: where it came from, for the error message.

    Returns:
        The config as a plain dict (``seeds``, ``erc`` and ``settings`` always present).

    Raises:
        ConfigError: one line naming the offending key and value.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: an experiment config is a JSON object, got {raw!r:.60}")
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            f"{source}: {_describe(err, list(ExperimentConfig.model_fields))}"
        ) from None
    model = _trainer_model(config.kind)
    for i, env in enumerate(config.envs):
        merged = {**config.settings, **env.kwargs()}
        where = f"envs[{i}] ({env.resolved_label()}) / settings"
        try:
            model.model_validate(merged)
        except ValidationError as err:
            text = _describe(err, list(model.model_fields), where)
            raise ConfigError(f"{source}: {text}") from None
        if config.kind == "sb3":
            _check_sb3_env(merged, source, where)
            _check_sb3_target(merged, config.erc, f"{source}: {where}")
            continue
        cls = _trainer_class(config.kind)
        for algo in config.algorithms:
            for band in config.erc:
                low, high = band if band is not None else (None, None)
                values = {**merged, "loss": algo, "erc_low": low, "erc_high": high}
                try:
                    cls(**values).validate()
                except ValueError as err:
                    raise ConfigError(f"{source}: {where}: {err}") from None
    out = config.model_dump(exclude_unset=False)
    out["envs"] = [{**({"label": e.label} if e.label else {}), **e.kwargs()} for e in config.envs]
    out["erc"] = [list(b) if b is not None else None for b in config.erc]
    if not out["description"]:
        out.pop("description")
    for key in ("axes", "baseline"):
        if out[key] is None:
            out.pop(key)
    return out


def _check_sb3_target(merged: dict[str, Any], bands: list[Any], where: str) -> None:
    """ERCPPO checks ``erc_target_clip_fraction`` only when a run starts: check it per band now."""
    from erc_gym.adaptive_band import check_target_clip_fraction

    for band in bands:
        low, high = band if band is not None else (None, None)
        try:
            check_target_clip_fraction(merged.get("erc_target_clip_fraction"), low, high)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None


def _check_sb3_env(merged: dict[str, Any], source: str, where: str) -> None:
    from erc_gym.sb3.presets import PRESETS

    if merged["id"] not in PRESETS:
        raise ConfigError(
            f"{source}: {where}: id = {merged['id']!r}: no preset for it; choose from "
            f"{sorted(PRESETS)}"
        )
