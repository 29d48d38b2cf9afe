"""The experiment tooling: grids of runs, run folders, statistics, figures and reports.

The layout shows the architecture (``docs/architecture.md``); each module imports only those
above it in this list:

* :mod:`~erc_gym.lab.kinds` -- the trainer kinds (``bandit``, ``sb3``, ``llm``): one module each,
  owning its settings, checks, stress-axis settings, resolved config, budget, labels, metric keys
  and training driver, and a registry (:func:`~erc_gym.lab.kinds.register_kind`);
* :mod:`~erc_gym.lab.grid` -- :class:`~erc_gym.lab.grid.RunSpec`, :func:`~erc_gym.lab.grid.expand`,
  variant labels and the stress axes;
* :mod:`~erc_gym.lab.config` -- the experiment config files and their schema;
* :mod:`~erc_gym.lab.rundir` -- the run-folder protocol (``run.json``, lock, ``done``);
* :mod:`~erc_gym.lab.runner` -- running a grid: processes, signals, progress;
* :mod:`~erc_gym.lab.ray_launcher` -- running a grid on a Ray cluster (the ``ray`` extra);
* :mod:`~erc_gym.lab.stats` -- IQM, bootstrap intervals, probability of improvement;
* :mod:`~erc_gym.lab.analysis` -- reading a runs folder, per-variant summaries;
* :mod:`~erc_gym.lab.stress` -- the off-policy stress-map tables and the paper's claims;
* :mod:`~erc_gym.lab.plots` -- figures; :mod:`~erc_gym.lab.report` -- Markdown and HTML reports.

The shipped experiment configs are package data in ``erc_gym/lab/configs``. The names below are
importable from ``erc_gym.lab`` directly; each is resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it; imported on first attribute access.
_LAZY: dict[str, str] = {
    "RunSpec": "erc_gym.lab.grid",
    "expand": "erc_gym.lab.grid",
    "load_experiment": "erc_gym.lab.config",
    "list_experiments": "erc_gym.lab.config",
    "register_kind": "erc_gym.lab.kinds",
    "run_experiment": "erc_gym.lab.runner",
    "LocalLauncher": "erc_gym.lab.runner",
    "RayLauncher": "erc_gym.lab.ray_launcher",
    "load_runs": "erc_gym.lab.analysis",
    "summarize": "erc_gym.lab.analysis",
    "plot_experiment": "erc_gym.lab.plots",
    "write_report": "erc_gym.lab.report",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'erc_gym.lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
