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
* ``done`` -- the marker of a finished run (:func:`mark_done`): its training time and the line
  count and SHA-256 of its ``metrics.jsonl``, so that a log cut short or edited after the run
  finished is found (:func:`done_problem`) instead of counted; and ``error.log`` -- the
  traceback of a run that raised;
* ``.lock`` -- held while a process trains the run (:func:`hold`).

Every file here is written with :func:`erc_gym.atomic.atomic_write`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erc_gym.atomic import atomic_write, merge_json
from erc_gym.lab.kinds import get_kind

if TYPE_CHECKING:
    from erc_gym.lab.grid import RunSpec

__all__ = [
    "ConfigMismatch",
    "DoneMarker",
    "RunLocked",
    "clear",
    "config_diff",
    "done_problem",
    "hold",
    "is_done",
    "mark_done",
    "metrics_digest",
    "mismatch_message",
    "read_done",
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
    merge_json(folder / "config.json", run.meta())


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
    """Whether the run finished (its ``done`` marker exists): the runner leaves such a run alone.
    Whether its metrics are still those it finished with is :func:`done_problem`'s question."""
    return (folder / "done").exists()


@dataclass(frozen=True)
class DoneMarker:
    """What a ``done`` marker records: the training time and, since markers record them, the
    line count and SHA-256 (hex) of ``metrics.jsonl`` when the run finished (None in an older
    marker, which held the time alone)."""

    seconds: float
    metrics_lines: int | None = None
    metrics_sha256: str | None = None


def metrics_digest(folder: Path) -> tuple[int, str]:
    """``(lines, sha256 hex)`` of the folder's ``metrics.jsonl`` (``(0, sha256 of b"")`` when
    there is none)."""
    try:
        data = (folder / "metrics.jsonl").read_bytes()
    except FileNotFoundError:
        data = b""
    return data.count(b"\n"), hashlib.sha256(data).hexdigest()


def mark_done(folder: Path, seconds: float) -> None:
    """Write the ``done`` marker (the training time, the line count and SHA-256 of
    ``metrics.jsonl``) and drop an old ``error.log``."""
    lines, digest = metrics_digest(folder)
    marker = {"seconds": round(seconds, 1), "metrics_lines": lines, "metrics_sha256": digest}
    atomic_write(folder / "done", json.dumps(marker) + "\n")
    (folder / "error.log").unlink(missing_ok=True)


def read_done(folder: Path) -> DoneMarker | None:
    """The folder's ``done`` marker (None: the run has not finished).

    Raises:
        ValueError: the marker is neither this module's JSON nor an older marker (the training
            seconds alone).
    """
    try:
        text = (folder / "done").read_text()
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, int | float) and not isinstance(value, bool):  # an older marker
        return DoneMarker(float(value))
    if isinstance(value, dict) and isinstance(value.get("seconds"), int | float):
        lines, digest = value.get("metrics_lines"), value.get("metrics_sha256")
        if isinstance(lines, int) and isinstance(digest, str):
            return DoneMarker(float(value["seconds"]), lines, digest)
    raise ValueError(f"{folder / 'done'}: not a done marker ({text.strip()[:60]!r})")


def done_problem(folder: Path) -> str | None:
    """Why a run with a ``done`` marker does not count as finished, or None (it does; also for a
    folder without a marker, and for an older marker, which records no checksum to compare).

    A run's ``metrics.jsonl`` never changes once it is done: different lines or a different
    checksum mean that it was cut short (a full disk while copying, a truncation) or edited.
    """
    try:
        marker = read_done(folder)
    except (OSError, ValueError) as err:
        return f"its done marker cannot be read ({err})"
    if marker is None or marker.metrics_sha256 is None:
        return None
    try:
        lines, digest = metrics_digest(folder)
    except OSError as err:
        return f"its metrics.jsonl cannot be read ({err.strerror or err})"
    if lines != marker.metrics_lines:
        return (
            f"metrics.jsonl has {lines} lines, {marker.metrics_lines} when the run finished "
            "(cut short or edited since)"
        )
    if digest != marker.metrics_sha256:
        return "metrics.jsonl differs from the file the run finished with (edited since)"
    return None


def write_error(folder: Path, text: str) -> str | None:
    """Record the traceback of a run that raised (``error.log``); never raises.

    Returns:
        None when written, else why not (``No space left on device``): the caller then shows
        the error itself, as no file holds it.
    """
    try:
        atomic_write(folder / "error.log", text)
    except OSError as err:
        return err.strerror or str(err)
    return None
