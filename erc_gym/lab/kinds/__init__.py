"""The registry of trainer kinds: the config's ``kind`` -> a :class:`~erc_gym.lab.kinds.base.Kind`.

A new kind is one module in this folder defining ``KIND`` (an object following
:class:`~erc_gym.lab.kinds.base.Kind`) and one line in :data:`BUILTIN_KINDS`; a kind outside the
package is added with :func:`register_kind`. Built-in kinds are imported on first use, so reading
a runs folder never imports stable-baselines3 or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from erc_gym.lab.kinds.base import Kind

__all__ = [
    "BUILTIN_KINDS",
    "Kind",
    "axis_settings",
    "get_kind",
    "kind_names",
    "one_of",
    "register_kind",
]

#: Built-in kinds: name -> the module that defines ``KIND``.
BUILTIN_KINDS: dict[str, str] = {
    "sb3": "erc_gym.lab.kinds.sb3",
    "bandit": "erc_gym.lab.kinds.bandit",
    "llm": "erc_gym.lab.kinds.llm",
}

_REGISTERED: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Make ``kind`` available as ``"kind": kind.name`` in experiment configs; returns it.

    Runs in worker processes see it when they are forked from the registering process (the
    runner's default on Linux).
    """
    _REGISTERED[kind.name] = kind
    return kind


def kind_names() -> list[str]:
    """The names a config's ``kind`` may take: the built-in ones, then the registered ones."""
    return list(dict.fromkeys([*BUILTIN_KINDS, *_REGISTERED]))


def one_of(names: list[str]) -> str:
    """``'a', 'b' or 'c'`` (the wording of pydantic's literal errors)."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def get_kind(name: str) -> Kind:
    """The kind called ``name``.

    Raises:
        ValueError: no such kind (the message lists the known ones).
    """
    if isinstance(name, str) and name in _REGISTERED:
        return _REGISTERED[name]
    if isinstance(name, str) and name in BUILTIN_KINDS:
        kind: Kind = importlib.import_module(BUILTIN_KINDS[name]).KIND
        return kind
    raise ValueError(f"kind must be {one_of(sorted(kind_names()))}, got {name!r}")


def axis_settings(
    kind: str, env: dict[str, Any], settings: dict[str, Any], point: dict[str, Any]
) -> dict[str, Any]:
    """Trainer settings that put a run of ``kind`` at a stress point, merged over ``settings``.

    ``steps_per_rollout`` S (optimiser steps on one sampled batch = mini-batches x epochs) and
    ``lr`` (the learning rate) in each trainer's own terms:

    * ``bandit``: ``minibatches = S``, ``lr``;
    * ``llm``: with P = ``prompts_per_step`` (default 16), ``mini_batch_prompts = P / S`` and one
      epoch for S <= P, else one prompt per mini-batch and ``epochs = S / P`` (S must divide P or
      be a multiple of it); ``lr``;
    * ``sb3``: the whole rollout (``n_envs x n_steps``) is one mini-batch and ``n_epochs = S``;
      ``learning_rate`` (a constant replacing the preset's schedule).
    """
    return get_kind(kind).axis_settings(env, settings, point)
