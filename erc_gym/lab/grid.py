"""The grid of an experiment: which runs it holds, what each is called, the stress axes.

An experiment's grid is env x stress point x algorithm x ERC band x seed (:func:`expand`, in that
nesting order). A run is a :class:`RunSpec`; its folder is ``<runs>/<experiment>/<variant>/<seed>``
where the variant joins the env label, the algorithm, the band and the stress point, e.g.
``V4096-ppo-erc0.95-1.05-s8-lr0.05``.

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

__all__ = [
    "AXES",
    "RunSpec",
    "axis_label",
    "axis_points",
    "band_label",
    "check_axes",
    "expand",
    "seed_list",
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


def expand(spec: dict[str, Any]) -> list[RunSpec]:
    """The experiment's grid: env x stress point x algorithm x ERC band x seed (nesting order)."""
    seeds = seed_list(spec.get("seeds", 3))
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
                    variant = f"{label}-{algo}{band_label(erc)}{rule}{suffix}"
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
                        for seed in seeds
                    )
    return runs
