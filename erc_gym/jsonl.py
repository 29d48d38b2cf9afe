"""Strict JSON Lines for run logs: the one reader and writer of every ``metrics.jsonl``.

Python's ``json`` writes ``NaN`` and ``Infinity``, which strict readers (jq, JavaScript, most JSON
libraries) reject. Run logs therefore store non-finite floats as ``null``; readers get ``nan``
back for ``null`` in numeric series (see :func:`read_jsonl`). A last line cut short by a killed
process is skipped on read and removed by :func:`repair_jsonl` before appending, so a resumed
run never writes after a broken line. A resumed run keeps the lines up to its checkpoint with
:func:`truncate_metrics`, which rewrites the file atomically (:func:`erc_gym.atomic.atomic_write`):
a kill during the rewrite leaves the old file, never a shorter one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from erc_gym.atomic import atomic_write

__all__ = [
    "append_jsonl",
    "dumps_strict",
    "last_value",
    "read_jsonl",
    "repair_jsonl",
    "truncate_metrics",
]


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps_strict(row: Any, **kwargs: Any) -> str:
    """``json.dumps`` with every non-finite float written as ``null`` (valid strict JSON)."""
    return json.dumps(_finite(row), allow_nan=False, **kwargs)


def append_jsonl(path: str | Path, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
    """Append one row (a mapping) or several rows to ``path``, one strict JSON object a line.

    The rows are written with a single ``write`` call and flushed, so a kill leaves at most one
    partial last line, which :func:`read_jsonl` skips and :func:`repair_jsonl` removes.
    """
    batch = [rows] if isinstance(rows, Mapping) else list(rows)
    text = "".join(dumps_strict(r) + "\n" for r in batch)
    try:
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if err.filename is None:  # a full disk shows in write/flush, which name no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def _complete_lines(data: bytes) -> list[bytes]:
    """The lines of ``data`` (with their newline) up to the last one that is complete JSON.

    A line without its newline, or one that does not parse, at the end of the file is what a kill
    during :func:`append_jsonl` leaves; it is dropped (and any such lines before it).
    """
    keep = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    lines = keep.splitlines(keepends=True)
    while lines:
        try:
            json.loads(lines[-1])
            break
        except ValueError:
            lines.pop()
    return lines


def _rewrite(path: Path, data: bytes, lines: list[bytes]) -> int:
    """Replace ``path`` by ``lines`` (atomically, only if that changes it); return lines dropped."""
    fixed = b"".join(lines)
    if fixed != data:
        atomic_write(path, fixed)
    total = data.count(b"\n") + (0 if not data or data.endswith(b"\n") else 1)
    return total - len(lines)


def repair_jsonl(path: str | Path) -> int:
    """Drop a partial last line (no trailing newline or not valid JSON); return lines dropped."""
    p = Path(path)
    if not p.exists():
        return 0
    data = p.read_bytes()
    if not data:
        return 0
    return _rewrite(p, data, _complete_lines(data))


def truncate_metrics(path: str | Path, key: str, upto: float) -> int:
    """Keep the lines of a run log up to a restored checkpoint; return the lines dropped.

    A line is kept when its ``key`` is at most ``upto`` (a line without ``key`` counts as 0, e.g.
    a log line written before the first step); a partial last line left by a kill is dropped. The
    file is replaced atomically and only when something is dropped, so a kill during the rewrite
    keeps every line of the previous file.

    Args:
        path: the ``metrics.jsonl`` (nothing happens when it does not exist).
        key: the counter the checkpoint records (``iteration``, ``step``,
            ``time/total_timesteps``).
        upto: the counter's value at the checkpoint.
    """
    p = Path(path)
    if not p.exists():
        return 0
    data = p.read_bytes()
    kept = []
    for line in _complete_lines(data):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a damaged line inside the file: readers skip it too
            continue
        value = row.get(key, 0) if isinstance(row, dict) else None
        if isinstance(value, int | float) and value <= upto:
            kept.append(line)
    return _rewrite(p, data, kept)


def last_value(path: str | Path, key: str) -> float | None:
    """``key`` of the last complete line of ``path`` that has it (reads only the file's tail)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")[1:-1] if size > 65536 else tail.split(b"\n")[:-1]):
        try:
            value = json.loads(line).get(key)
        except (ValueError, AttributeError):
            continue
        if isinstance(value, int | float):
            return float(value)
    return None


def read_jsonl(path: str | Path, skipped: list[int] | None = None) -> list[dict[str, Any]]:
    """Every complete JSON object line of ``path`` (``[]`` if missing); ``null`` -> ``nan``.

    Lines that do not parse (a line cut short by an interrupted run, a damaged one) or are not
    JSON objects are skipped; their numbers (from 1) are appended to ``skipped`` when it is
    given, so that a reader can say which. Top-level ``null`` values become ``float('nan')`` so
    numeric series keep their length.
    """
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    text = p.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
        elif skipped is not None:
            skipped.append(number)
    return rows
