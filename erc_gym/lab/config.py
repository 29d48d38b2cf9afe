"""Experiment config files: where they are, how they are read, and the schema they must fit.

An experiment is a small JSON file (the shipped ones are package data in ``erc_gym/lab/configs/``,
listed by ``erc-gym experiment --list``)::

    {
      "name": "quick",
      "kind": "bandit",                      # a trainer kind: "sb3" (ERCPPO), "bandit", "llm"
      "seeds": 3,                            # a count (seeds 0..n-1) or a list of seeds
      "algorithms": ["ppo"],                 # recipes of erc_gym.losses.RECIPES
      "erc": [null, [0.95, 1.05]],           # null = ERC off, [low, high] = a band
      "envs": [{"label": "V4096", "vocab_size": 4096}],
      "settings": {"iterations": 40},        # shared by every run
      "axes": {"steps_per_rollout": [2, 8], "lr": [0.05, 0.2]},  # optional stress grid
      "baseline": "stress_bandit",           # optional: an experiment the report compares with
      "primary": [{"env": "V4096", "erc": [0.95, 1.05]}],  # optional: the main comparisons
      "resources": {"CPU": 2}                # optional: what one run takes on a Ray cluster
    }

``methods`` (optional, in place of ``erc``) makes the grid compare rival methods, baselines and
controls (:data:`erc_gym.losses.METHODS`, ``docs/rivals.md``) on top of each algorithm::

    "methods": ["base", "erc", "random-matched", "equal-step",
                {"name": "clip-cov", "clip_cov_ratio": 0.3},
                {"name": "erc", "label": "erc-wide", "erc_low": 0.8, "erc_high": 1.2}]

An entry is a registry name or an object with ``name``, an optional ``label`` (names its runs;
default: the name; labels are unique) and overrides of the method's settings (the fields of
:class:`erc_gym.methods.MethodSettings`, ``erc_low`` / ``erc_high`` -- the band -- and
``erc_target_clip_fraction``). Each method sets its own ERC band (``erc``: (0.95, 1.05); every
other method: off), so ``erc`` and ``methods`` are exclusive. Refused as contradictory: a setting
given both in ``settings`` (or an env) and by a method (set it in the method's entry), and a
control (``random-matched``, ``equal-step``) imitating a band that no ERC method of the config
uses. The reports compare every method with ``base`` (or, without it, the first entry) and ERC
with each other method at the same point (:func:`erc_gym.lab.stress.method_table`).

``axes`` (optional) repeats the grid on every point of an off-policy stress map
(:mod:`erc_gym.lab.grid`); variant names then end in ``-s<S>-lr<lr>``. ``baseline`` (optional)
names another experiment in the same runs folder whose stress-map runs the report adds (e.g. the
fixed bands an adaptive band is compared with). A run with ``erc_target_clip_fraction`` in its
settings (:mod:`erc_gym.adaptive_band`) gets ``-target<f>`` after its band in the variant name.
``primary`` (optional) declares the study's main comparisons before it runs: each entry selects
the cells (and so their comparisons with the baseline at the same point) whose values match every
key it gives, of ``env`` (a label), ``algorithm``, ``erc`` (a band, or ``null``),
``steps_per_rollout`` and ``lr`` (stress-axis values), and in a config with ``methods``
``method`` (a label: its comparison with ``against``) and ``against`` (a label; default: the
reference, ``base``). The report adjusts the selected comparisons for multiple testing as one
family and calls the others exploratory (:func:`erc_gym.lab.stress.adjust_family`,
``docs/statistics.md``).
``cells`` (optional) keeps only some cells of the product grid, each entry selecting the cells
whose values match every key it gives, of ``env``, ``algorithm``, ``steps_per_rollout`` and
``lr``, e.g. ``[{"algorithm": "gppo", "steps_per_rollout": 16, "lr": 0.001}, {"algorithm":
"ppo", "steps_per_rollout": 4, "lr": 0.003}]``: the collapse cell of one algorithm and a healthy
cell of another without the rest of their product.
``kind`` chooses the trainer (:mod:`erc_gym.lab.kinds`); the settings are the trainer's own.
``resources`` (optional) overrides, key by key, what the kind asks a Ray cluster for each run
(``Kind.resources``: one CPU, and a GPU for ``llm`` runs on ``cuda``), in Ray's resource names:
``CPU``, ``GPU``, ``memory`` (bytes) or a custom resource of the cluster (docs/cluster.md). The
local launcher ignores it; it is not part of a run's identity (``run.json``).

A config is validated with pydantic in two passes:

1. the file's own shape (:class:`ExperimentConfig`): no unknown top-level keys, integer seeds
   (a count from 1 to :data:`~erc_gym.limits.MAX_GRID_SEEDS` or a list of distinct seeds from 0
   to :data:`~erc_gym.limits.MAX_GRID_SEED`), non-empty lists of known algorithms and
   environments, ERC bands ``[low, high]`` with ``0 < low < 1 < high``, distinct env labels;
2. the settings each run's trainer receives (``settings`` merged with an env's own keys): only
   keys the trainer knows (its kind's settings model), with the trainer's types and its own range
   checks (the kind's ``check``).

Errors become one :class:`ConfigError` (a ``ValueError``) whose message names the key and the
value, e.g. ``seeds = '12': Input should be a valid integer``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from erc_gym.lab.grid import BAND_KEYS, MethodEntry, check_axes, method_entries
from erc_gym.lab.kinds import BUILTIN_KINDS, get_kind, kind_names, one_of
from erc_gym.limits import MAX_GRID_SEED, MAX_GRID_SEEDS
from erc_gym.losses import METHODS, RECIPES
from erc_gym.methods import MethodSettings

__all__ = [
    "ALGORITHMS",
    "CONFIG_DIR",
    "KINDS",
    "METHOD_KEYS",
    "ConfigError",
    "ExperimentConfig",
    "find_experiment",
    "list_experiments",
    "load_experiment",
    "override_settings",
    "validate_experiment",
]

#: Where the shipped experiment configs live (package data; ``experiments/configs`` links here).
CONFIG_DIR = Path(str(resources.files("erc_gym.lab").joinpath("configs")))
#: The built-in trainer kinds (:func:`erc_gym.lab.kinds.kind_names` adds registered ones).
KINDS = tuple(BUILTIN_KINDS)
#: Algorithms of the grid: the recipes of the shared loss.
ALGORITHMS = tuple(RECIPES)

if TYPE_CHECKING:
    Algorithm = str
else:
    Algorithm = Literal[ALGORITHMS]


class ConfigError(ValueError):
    """An experiment config that does not fit the schema (the message is one line)."""


Band = tuple[StrictFloat, StrictFloat]

#: The keys a ``methods`` entry may set besides ``name`` and ``label``: the methods' settings
#: (:class:`erc_gym.methods.MethodSettings`), the ERC band and the adaptive band's target.
METHOD_KEYS = (
    *(f.name for f in dataclasses.fields(MethodSettings)),
    *BAND_KEYS,
    "erc_target_clip_fraction",
)
_LABEL = r"^[A-Za-z0-9_.+=-]+$"


def _did_you_mean(value: str, known: list[str]) -> str:
    close = difflib.get_close_matches(value, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_method_entry(i: int, entry: Any) -> None:
    """Raise ``ValueError`` (one line) unless ``entry`` is a method name or a valid object."""
    where = f"methods[{i}]"
    names = list(METHODS)
    if isinstance(entry, str):
        if entry not in METHODS:
            raise ValueError(
                f"{where} = {entry!r}: unknown method{_did_you_mean(entry, names)}; known: "
                + ", ".join(names)
            )
        return
    if not isinstance(entry, dict):
        raise ValueError(
            f"{where} = {entry!r:.60}: a method is a name of {names[:3]}... or an object "
            '{"name": ..., <setting>: <value>}'
        )
    name = entry.get("name")
    if not isinstance(name, str):
        raise ValueError(f"{where}: missing 'name' (a method of erc_gym.losses.METHODS)")
    if name not in METHODS:
        raise ValueError(
            f"{where}.name = {name!r}: unknown method{_did_you_mean(name, names)}; known: "
            + ", ".join(names)
        )
    label = entry.get("label")
    if label is not None and not (isinstance(label, str) and re.match(_LABEL, label)):
        raise ValueError(f"{where}.label = {label!r}: letters, digits and _.+=- only")
    for key in entry:
        if key not in ("name", "label", *METHOD_KEYS):
            raise ValueError(
                f"{where}.{key}: unknown key{_did_you_mean(key, [*METHOD_KEYS, 'label'])}"
            )


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


class CellSelector(BaseModel):
    """One entry of ``cells``: the cells of the grid whose values match every key given."""

    model_config = ConfigDict(extra="forbid", strict=True)

    env: str | None = None
    algorithm: str | None = None
    steps_per_rollout: int | None = None
    lr: float | int | None = None

    def check_in(self, config: ExperimentConfig, where: str) -> None:
        """Raise ``ValueError`` when a given key names a value the grid does not have (the grid
        is a product, so a selector of values it has selects at least one cell)."""
        given = self.model_dump(exclude_unset=True)
        if not given:
            keys = list(type(self).model_fields)
            raise ValueError(f"{where}: select cells with at least one of {keys}")
        have = config.grid_values()
        for key, value in given.items():
            if key == "erc" and value is not None:
                value = [float(v) for v in value]
            elif key == "lr":
                value = float(value)
            if value not in have[key]:
                raise ValueError(
                    f"{where}.{key} = {value!r}: not a value of the grid (choose from {have[key]})"
                )


class PrimaryCell(CellSelector):
    """One entry of ``primary``: the cells (comparisons) whose values match every key given."""

    erc: Band | None = None
    method: str | None = None
    """A method's label (a config with ``methods``): its comparison with ``against``."""
    against: str | None = None
    """The method compared with (default: the reference, ``base`` or the first method)."""

    def check_in(self, config: ExperimentConfig, where: str) -> None:
        """As :meth:`CellSelector.check_in`; ``method`` and ``against`` need ``methods``."""
        given = self.model_dump(exclude_unset=True)
        if not config.methods and ("method" in given or "against" in given):
            raise ValueError(
                f"{where}: 'method' and 'against' select methods; this config has none"
            )
        if given.get("method") is not None and given.get("method") == given.get("against"):
            raise ValueError(f"{where}: a method is not compared with itself ({given['method']!r})")
        super().check_in(config, where)


class ExperimentConfig(BaseModel):
    """An experiment config file (see the module docstring for the meaning of each key)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.+=-]+$")]
    """Experiment name: the folder ``<runs>/<name>``."""
    description: str = ""
    """Free text shown at the top of the report."""
    kind: str
    """Which trainer runs the grid (:mod:`erc_gym.lab.kinds`)."""
    seeds: (
        Annotated[StrictInt, Field(ge=1, le=MAX_GRID_SEEDS)]
        | Annotated[list[Annotated[StrictInt, Field(ge=0, le=MAX_GRID_SEED)]], Field(min_length=1)]
    ) = 3
    """A number of seeds (0 .. n-1, at most :data:`~erc_gym.limits.MAX_GRID_SEEDS`) or an
    explicit list of seeds (each at most :data:`~erc_gym.limits.MAX_GRID_SEED`)."""
    algorithms: Annotated[list[Algorithm], Field(min_length=1)]
    """Clip variants of the grid."""
    erc: Annotated[list[Band | None], Field(min_length=1)] = [None]
    """ERC bands of the grid; ``null`` is ERC off."""
    methods: list[Any] | None = None
    """Optional method axis in place of ``erc``: names of :data:`erc_gym.losses.METHODS` or
    ``{"name": ..., "label": ..., <setting>: <value>}`` objects (see the module docstring)."""
    envs: Annotated[list[EnvEntry], Field(min_length=1)]
    """Environments of the grid."""
    settings: dict[str, Any] = {}
    """Trainer settings shared by every run (an env's own keys override them)."""
    axes: dict[str, Any] | None = None
    """Optional off-policy stress grid, e.g. ``{"steps_per_rollout": [1, 8], "lr": [...]}``
    (:mod:`erc_gym.lab.grid`)."""
    baseline: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.+=-]+$")] | None = None
    """Optional name of another experiment in the same runs folder whose stress-map runs the
    report adds, e.g. the fixed band that an adaptive band (``erc_target_clip_fraction``) is
    compared with (:func:`erc_gym.lab.stress.band_rule_table`)."""
    resources: (
        dict[str, Annotated[StrictInt | StrictFloat, Field(ge=0, allow_inf_nan=False)]] | None
    ) = None
    """Optional: what one run takes on a Ray cluster, over its kind's request, e.g.
    ``{"CPU": 2, "GPU": 0.5}`` (the ``ray`` launcher; docs/cluster.md)."""

    primary: Annotated[list[PrimaryCell], Field(min_length=1)] | None = None
    """Optional main comparisons, declared up front: cell selectors (:class:`PrimaryCell`)."""
    cells: Annotated[list[CellSelector], Field(min_length=1)] | None = None
    """Optional: run only these cells of the product grid (:class:`CellSelector`)."""

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, value: Any) -> Any:
        names = kind_names()
        if not isinstance(value, str) or value not in names:
            raise PydanticCustomError(
                "literal_error", "Input should be {expected}", {"expected": one_of(names)}
            )
        return value

    def grid_values(self) -> dict[str, list[Any]]:
        """The values of each key a cell selector may give (``erc``: the bands, each method's in
        a config with ``methods``)."""
        axes = self.axes or {}
        entries = self.method_entries()
        bands = [m.band for m in entries] if entries else self.erc
        return {
            "env": [e.resolved_label() for e in self.envs],
            "algorithm": list(self.algorithms),
            "erc": [None if b is None else [float(v) for v in b] for b in bands],
            "steps_per_rollout": list(axes.get("steps_per_rollout", [])),
            "lr": [float(v) for v in axes.get("lr", [])],
            "method": [m.label for m in entries],
            "against": [m.label for m in entries],
        }

    def method_entries(self) -> list[MethodEntry]:
        """The ``methods`` resolved (empty without them); call after validation."""
        return method_entries(self.methods) if self.methods else []

    def _check_methods(self) -> None:
        if self.methods is None:
            return
        if "erc" in self.model_fields_set:
            raise ValueError(
                "erc and methods: each method sets its own ERC band (method 'erc', or erc_low / "
                "erc_high in a method's entry); remove erc"
            )
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError("methods: a non-empty list of method names or objects")
        for i, entry in enumerate(self.methods):
            _check_method_entry(i, entry)
        entries = method_entries(self.methods)
        labels = [m.label for m in entries]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(
                f"methods: duplicate label {', '.join(map(repr, dup))} (each names run folders; "
                'give the entries their own "label")'
            )
        for i, (raw, m) in enumerate(zip(self.methods, entries, strict=True)):
            where = f"methods[{i}] ({m.label})"
            given = {k: v for k, v in (raw if isinstance(raw, dict) else {}).items()}
            low, high = (given.get(k, METHODS[m.name].get(k)) for k in BAND_KEYS)
            if (low is None) != (high is None):
                raise ValueError(
                    f"{where}: erc_low and erc_high make the band: set both, or both null"
                )
            if m.band is not None and not 0 < m.band[0] < 1 < m.band[1]:
                raise ValueError(
                    f"{where}: the ERC band {list(m.band)} needs 0 < erc_low < 1 < erc_high"
                )
        erc_bands = {m.band for m in entries if m.band is not None}
        for i, m in enumerate(entries):
            control = m.settings.get("control_low"), m.settings.get("control_high")
            if erc_bands and None not in control and control not in erc_bands:
                shown = ", ".join(str(b) for b in sorted(erc_bands))
                raise ValueError(
                    f"methods[{i}] ({m.label}) imitates the band {control}, which no ERC method "
                    f"of this config uses ({shown}): set its control_low / control_high to one"
                )
        for m in entries:
            for source, keys in [("settings", self.settings)] + [
                (f"envs[{j}] ({e.resolved_label()})", e.kwargs()) for j, e in enumerate(self.envs)
            ]:
                both = sorted(set(keys) & set(m.settings))
                if both:
                    raise ValueError(
                        f"{source}.{both[0]} is also set by method {m.label!r}: set it in the "
                        "method's entry (a shared value would change what the method means)"
                    )

    @model_validator(mode="after")
    def _check_grid(self) -> ExperimentConfig:
        self._check_methods()
        if self.baseline == self.name:
            raise ValueError(f"baseline = {self.baseline!r}: an experiment is not its own baseline")
        if self.axes is not None:
            check_axes(self.axes)
        for name, amount in (self.resources or {}).items():
            if not name:
                raise ValueError("resources: a resource name is a non-empty string")
            if amount > 1 and not float(amount).is_integer():
                raise ValueError(
                    f"resources.{name} = {amount}: Ray takes a fraction below 1 or a whole number"
                )
        for i, band in enumerate(self.erc):
            if band is not None and not 0 < band[0] < 1 < band[1]:
                raise ValueError(
                    f"erc[{i}] = {list(band)}: an ERC band is [low, high] with 0 < low < 1 < high"
                )
        for i, cell in enumerate(self.primary or []):
            cell.check_in(self, f"primary[{i}]")
        for i, selector in enumerate(self.cells or []):
            selector.check_in(self, f"cells[{i}]")
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
        The config as a plain dict (``seeds`` and ``settings`` always present, ``erc`` unless
        it has ``methods``).

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
    kind = get_kind(config.kind)
    model = kind.settings_model()
    # (where, settings, bands) of each env -- and of each of its methods
    checks: list[tuple[str, dict[str, Any], list[Any]]] = []
    for i, env in enumerate(config.envs):
        merged = {**config.settings, **env.kwargs()}
        where = f"envs[{i}] ({env.resolved_label()}) / settings"
        if not config.methods:
            checks.append((where, merged, list(config.erc)))
        for j, m in enumerate(config.method_entries()):
            own = {**merged, **m.settings}
            checks.append((f"{where} / methods[{j}] ({m.label})", own, [m.band]))
    for where, merged, bands in checks:
        try:
            model.model_validate(merged)
        except ValidationError as err:
            text = _describe(err, list(model.model_fields), where)
            raise ConfigError(f"{source}: {text}") from None
        try:
            kind.check(merged, config.algorithms, bands)
        except ValueError as err:
            raise ConfigError(f"{source}: {where}: {err}") from None
    out = config.model_dump(exclude_unset=False)
    out["envs"] = [{**({"label": e.label} if e.label else {}), **e.kwargs()} for e in config.envs]
    out["erc"] = [list(b) if b is not None else None for b in config.erc]
    if config.cells is not None:
        out["cells"] = [c.model_dump(exclude_unset=True) for c in config.cells]
    if config.primary is not None:
        out["primary"] = [c.model_dump(exclude_unset=True) for c in config.primary]
        for c in out["primary"]:
            if c.get("erc") is not None:
                c["erc"] = list(c["erc"])
    if not out["description"]:
        out.pop("description")
    if config.methods:
        out.pop("erc")  # each method sets its band
    for key in ("methods", "axes", "baseline", "primary", "cells", "resources"):
        if out[key] is None:
            out.pop(key)
    return out


def override_settings(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with ``overrides`` set for every run (``erc-gym experiment --set KEY=VALUE``).

    Each override replaces the config's ``settings`` value and every env's own value of the same
    key. The result is checked like any config when it is run.
    """
    envs = [{k: v for k, v in env.items() if k not in overrides} for env in spec["envs"]]
    return {**spec, "envs": envs, "settings": {**spec.get("settings", {}), **overrides}}
