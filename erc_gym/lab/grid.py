"""The grid of an experiment: which runs it holds, what each is called, the stress axes.

An experiment's grid is env x stress point x algorithm x ERC band x seed (:func:`expand`, in that
nesting order). A run is a :class:`RunSpec`; its folder is ``<runs>/<experiment>/<variant>/<seed>``
where the variant joins the env label, the algorithm, the band and the stress point, e.g.
``V4096-ppo-erc0.95-1.05-s8-lr0.05``.

A config with ``"methods"`` (the rival methods, baselines and controls of
:data:`erc_gym.losses.METHODS`, :func:`method_entries`) has a method axis in place of the band
axis: env x stress point x algorithm x method x seed. Each method sets its own ERC band (``erc``
sets (0.95, 1.05), every other method none) and its trainer settings, which join the run's
``settings``; the variant names the method's label in place of the band
(``CartPole-gppo-random-matched-s16-lr0.001``) and the run's ``axes`` record it as ``"method"``.

The optional stress grid (``"axes"`` of a config, e.g.
``{"steps_per_rollout": [2, 8, 16], "lr": [0.02, 0.1, 0.5]}``) repeats the grid on every point of
the product of the axes (:func:`axis_points`), with the settings each trainer kind derives from the
point (:func:`erc_gym.lab.kinds.axis_settings`: how far the policy moves per rollout, in each
trainer's own terms). Each run's ``config.json`` records the point under ``"axes"``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erc_gym.lab.kinds import get_kind
from erc_gym.losses import method_settings

__all__ = [
    "AXES",
    "BAND_KEYS",
    "MethodEntry",
    "RunSpec",
    "axis_label",
    "axis_points",
    "band_label",
    "check_axes",
    "expand",
    "method_entries",
    "seed_list",
    "selects",
]

#: The stress axes an experiment config may list under ``"axes"``.
AXES = ("steps_per_rollout", "lr")


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

    @property
    def method(self) -> str | None:
        """The label of the run's method (a config with ``methods``), else None."""
        label = self.axes.get("method")
        return None if label is None else str(label)

    def meta(self) -> dict[str, Any]:
        """What ``config.json`` records about the run besides the trainer's own settings
        (``method``: only in a config with ``methods``)."""
        method = {} if self.method is None else {"method": self.method}
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
            **method,
        }


def check_axes(axes: Any) -> None:
    """Raise ``ValueError`` unless ``axes`` maps names of :data:`AXES` to lists of values.

    ``steps_per_rollout`` takes integers >= 1, ``lr`` numbers > 0.
    """
    if not isinstance(axes, dict) or not axes:
        raise ValueError(f"axes must be a non-empty mapping of {AXES} to lists, got {axes!r}")
    for name, values in axes.items():
        if name not in AXES:
            raise ValueError(f"unknown stress axis {name!r}; choose from {AXES}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"axes.{name} must be a non-empty list, got {values!r}")
        for v in values:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and v > 0
            if name == "steps_per_rollout":
                ok = ok and float(v).is_integer()
            if not ok:
                what = "integers >= 1" if name == "steps_per_rollout" else "numbers > 0"
                raise ValueError(f"axes.{name} must hold {what}, got {v!r}")


def axis_points(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every point of the product of the axes (``steps_per_rollout`` varies slowest)."""
    names = [a for a in AXES if a in axes]
    return [
        dict(zip(names, combo, strict=True))
        for combo in itertools.product(*(axes[n] for n in names))
    ]


def axis_label(point: dict[str, Any]) -> str:
    """Variant suffix of a point, e.g. ``-s8-lr0.05``."""
    out = ""
    if "steps_per_rollout" in point:
        out += f"-s{int(point['steps_per_rollout'])}"
    if "lr" in point:
        out += f"-lr{float(point['lr']):g}"
    return out


def band_label(band: tuple[float, float] | None) -> str:
    """Variant part of an ERC band, e.g. ``-erc0.95-1.05`` (empty for ERC off)."""
    return "" if band is None else f"-erc{band[0]:g}-{band[1]:g}"


#: The settings of a method that form its ERC band (they become the run's ``erc``).
BAND_KEYS = ("erc_low", "erc_high")


@dataclass(frozen=True)
class MethodEntry:
    """One entry of a config's ``methods``, resolved.

    Attributes:
        label: names its runs (the variant part; the method's name unless the entry gives one).
        name: the registry name (:data:`erc_gym.losses.METHODS`).
        band: the ERC band it sets, or None (ERC off).
        settings: its other trainer settings (the registry's, then the entry's overrides).
    """

    label: str
    name: str
    band: tuple[float, float] | None
    settings: dict[str, Any]


def method_entries(methods: list[Any]) -> list[MethodEntry]:
    """A config's ``methods`` resolved: each entry a registry name or ``{"name": ..., "label":
    ..., <setting>: <value>, ...}`` (overrides on top of the registry's settings).

    Raises:
        ValueError: an unknown method name (the entries are checked by
            :mod:`erc_gym.lab.config` first, with a one-line message).
    """
    out = []
    for entry in methods:
        item = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = str(item.pop("name"))
        label = str(item.pop("label", None) or name)
        settings = method_settings(name, **item)
        low, high = (settings.pop(k, None) for k in BAND_KEYS)
        band = None if low is None or high is None else (float(low), float(high))
        out.append(MethodEntry(label=label, name=name, band=band, settings=settings))
    return out


def seed_list(seeds: int | list[int]) -> list[int]:
    """The seeds of a config's ``seeds``: a count n (``0 .. n-1``) or a list."""
    return list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]


def _stress_points(spec: dict[str, Any], env: dict[str, Any]) -> list[tuple[str, dict, dict]]:
    """``(variant suffix, axis point, settings)`` per point of the optional ``axes`` grid."""
    settings = dict(spec.get("settings", {}))
    if not spec.get("axes"):
        return [("", {}, settings)]
    kind = get_kind(spec["kind"])
    return [
        (axis_label(p), p, kind.axis_settings(env, settings, p)) for p in axis_points(spec["axes"])
    ]


def _bands(
    spec: dict[str, Any], settings: dict[str, Any], env: dict[str, Any]
) -> list[tuple[str, tuple[float, float] | None, dict[str, Any], dict[str, Any]]]:
    """``(variant part, ERC band, settings, axes entries)`` of each band -- or, in a config with
    ``methods``, of each method -- at one stress point."""
    if spec.get("methods"):
        return [
            (f"-{m.label}", m.band, {**settings, **m.settings}, {"method": m.label})
            for m in method_entries(spec["methods"])
        ]
    out: list[tuple[str, tuple[float, float] | None, dict[str, Any], dict[str, Any]]] = []
    for band in spec.get("erc", [None]):
        erc = None if band is None else (float(band[0]), float(band[1]))
        target = {**settings, **env}.get("erc_target_clip_fraction")
        rule = "" if erc is None or target is None else f"-target{float(target):g}"
        out.append((f"{band_label(erc)}{rule}", erc, dict(settings), {}))
    return out


def selects(selector: dict[str, Any], env: str, algorithm: str, point: dict[str, Any]) -> bool:
    """Whether a cell selector (an entry of a config's ``cells``) selects the cell of ``env``,
    ``algorithm`` and the stress point ``point``: every key it gives matches."""
    have = {"env": env, "algorithm": algorithm, **point}
    for key, want in selector.items():
        value = have.get(key)
        if key == "lr" and value is not None:
            if float(value) != float(want):
                return False
        elif value != want:
            return False
    return True


def expand(spec: dict[str, Any]) -> list[RunSpec]:
    """The experiment's grid: env x stress point x algorithm x ERC band (or method) x seed, in
    that nesting order; with ``cells``, only the cells they select (:func:`selects`)."""
    seeds = seed_list(spec.get("seeds", 3))
    cells = spec.get("cells")
    runs: list[RunSpec] = []
    for env in spec["envs"]:
        env = dict(env)
        label = env.pop("label", None) or env.get("id") or "env"
        for suffix, point, settings in _stress_points(spec, env):
            for algo in spec["algorithms"]:
                if cells and not any(selects(c, str(label), algo, point) for c in cells):
                    continue
                for part, erc, run_settings, method in _bands(spec, settings, env):
                    runs.extend(
                        RunSpec(
                            experiment=spec["name"],
                            variant=f"{label}-{algo}{part}{suffix}",
                            seed=seed,
                            kind=spec["kind"],
                            algorithm=algo,
                            erc=erc,
                            env=env,
                            settings=dict(run_settings),
                            env_label=str(label),
                            axes={**point, **method},
                        )
                        for seed in seeds
                    )
    return runs
