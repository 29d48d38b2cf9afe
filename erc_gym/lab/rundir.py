"""The run-folder protocol: what a run folder of an experiment holds and who may write it.

``<runs>/<experiment>/<variant>/<seed>/`` holds

* ``run.json`` -- the run's resolved config (:func:`resolved_config`): its identity and every
  trainer setting, defaults included. A re-run compares it with the current config
  (:func:`config_diff`) and refuses a folder made with another one (:class:`ConfigMismatch`)
  unless asked to start over (:func:`clear`);
* ``config.json`` -- the trainer's own record of its settings, with the runner's record of the
  run merged in (:func:`write_config`: variant, kind, env, axes ...), so that readers tell a grid
  run from a lone training run;
* ``metrics.jsonl`` (:mod:`erc_gym.jsonl`) and the trainer's checkpoint, both written by the
  trainer: checkpoints are replaced atomically and a resumed run keeps its log up to the
  checkpoint (:func:`erc_gym.jsonl.truncate_metrics`);
* ``done`` -- the marker of a finished run (:func:`mark_done`), and ``error.log`` -- the
  traceback of a run that raised;
* ``.lock`` -- held while a process trains the run (:func:`hold`).

Every file here is written with :func:`erc_gym.atomic.atomic_write`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erc_gym.atomic import atomic_write
from erc_gym.lab.kinds import get_kind

if TYPE_CHECKING:
    from erc_gym.lab.grid import RunSpec

__all__ = [
    "ConfigMismatch",
    "RunLocked",
    "clear",
    "config_diff",
    "hold",
    "is_done",
    "mark_done",
    "mismatch_message",
    "resolved_config",
    "write_config",
    "write_error",
    "write_json",
]

#: Keys of ``run.json`` that name the run (the rest is the trainer's resolved settings);
#: ``method`` only in a config with ``methods``.
_IDENTITY = ("experiment", "variant", "seed", "kind", "algorithm", "erc", "env_label", "method")
#: Trainer settings added after run folders were first recorded, with the default that
#: reproduces the older runs: left out of ``run.json`` at that default, so those folders still
#: match (and resume) instead of being refused as made with another config.
_ADDED_SETTINGS: dict[str, Any] = {"erc_target_clip_fraction": None}


class ConfigMismatch(ValueError):
    """Existing run folders were made with a different config (the message names the keys)."""


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


def resolved_config(run: RunSpec) -> dict[str, Any]:
    """What ``run.json`` records: the run's identity and every trainer setting, defaults included.

    A re-run compares this with the folder's ``run.json``; any difference is refused
    (:class:`ConfigMismatch`) unless asked to start over.
    """
    identity = {k: v for k, v in run.meta().items() if k in _IDENTITY}
    kind = get_kind(run.kind)
    trainer = kind.trainer_config(run)
    for key, default in {**_ADDED_SETTINGS, **getattr(kind, "added_settings", {})}.items():
        if key in trainer and trainer[key] == default:
            del trainer[key]
    return {**identity, "trainer": json.loads(json.dumps(trainer))}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flat(v, key + ".")
        else:
            out[key] = v
    return out


def config_diff(folder: Path, resolved: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each setting where the folder's ``run.json`` differs (``[]``: same
    or no record yet)."""
    path = folder / "run.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # no record yet (or being written: re-checked under the lock)
    before, after = _flat(old), _flat(resolved)
    return [
        f"{k.removeprefix('trainer.')}: {before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]


def mismatch_message(folder: Path, diffs: list[str]) -> str:
    """``<folder> was made with another config (<the first differences>)``."""
    shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
    return f"{folder} was made with another config ({shown})"


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON, replacing ``path`` atomically."""
    atomic_write(path, json.dumps(value, indent=2))


def write_config(folder: Path, run: RunSpec) -> None:
    """Merge the runner's record of the run into ``config.json`` (beside the trainer's keys)."""
    path = folder / "config.json"
    try:
        own = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        own = {}
    write_json(path, {**own, **run.meta()})


def clear(folder: Path) -> None:
    """Delete a run's outputs (not its lock file) to start it over."""
    for child in folder.iterdir():
        if child.name == ".lock":
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold the run folder's lock (an OS lock: released when its holder dies).

    Raises:
        RunLocked: another process holds it.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(folder / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunLocked(f"{folder} is being trained by another erc-gym process") from None
    try:
        yield
    finally:
        lock.release()


def is_done(folder: Path) -> bool:
    """Whether the run finished (its ``done`` marker exists)."""
    return (folder / "done").exists()


def mark_done(folder: Path, seconds: float) -> None:
    """Write the ``done`` marker (the run's training time) and drop an old ``error.log``."""
    atomic_write(folder / "done", f"{seconds:.1f}\n")
    (folder / "error.log").unlink(missing_ok=True)


def write_error(folder: Path, text: str) -> None:
    """Record the traceback of a run that raised (``error.log``); never raises."""
    with contextlib.suppress(OSError):
        atomic_write(folder / "error.log", text)
