"""Strict JSON Lines for run logs: the one reader and writer of every ``metrics.jsonl``.

Python's ``json`` writes ``NaN`` and ``Infinity``, which strict readers (jq, JavaScript, most JSON
libraries) reject. Run logs therefore store non-finite floats as ``null``; readers get ``nan``
back for ``null`` in numeric series (see :func:`read_jsonl`). A last line cut short by a killed
process is skipped on read and removed by :func:`repair_jsonl` before appending, so a resumed
run never writes after a broken line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "append_jsonl",
    "atomic_open",
    "atomic_write",
    "dumps_strict",
    "read_jsonl",
    "repair_jsonl",
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


class _KeepsWriteErrors:
    """A binary file whose first ``OSError`` is kept: some writers (``torch.save``) re-raise a
    full disk as their own exception, which names neither the cause nor the file."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[Any]:
    """A binary file that replaces ``path`` when the ``with`` block ends without an error.

    The data go to a temporary file in the same folder, are flushed to the disk (``fsync``) and
    then renamed over ``path`` (``os.replace``, atomic on POSIX and Windows). A reader never sees
    a half-written file, and a kill, an error or a full disk (``ENOSPC``) keeps the previous
    ``path``; the temporary file is removed on failure.

    Raises:
        OSError: the write failed (also when the writer turned it into another exception); its
            ``filename`` is ``path`` (an ``ENOSPC`` raised by a write call names no file).
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            kept = _KeepsWriteErrors(f)
            try:
                yield kept
            except Exception:
                if kept.error is None:
                    raise
                raise kept.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename in (None, tmp):
            raise OSError(err.errno, err.strerror, str(p)) from err
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Replace the file ``path`` with ``data`` all at once, or leave it as it was.

    See :func:`atomic_open` (temporary file, ``fsync``, rename; the error names ``path``).
    """
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


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


def repair_jsonl(path: str | Path) -> int:
    """Drop a partial last line (no trailing newline or not valid JSON); return lines dropped."""
    p = Path(path)
    if not p.exists():
        return 0
    data = p.read_bytes()
    if not data:
        return 0
    keep = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    lines = keep.splitlines(keepends=True)
    while lines:
        try:
            json.loads(lines[-1])
            break
        except ValueError:
            lines.pop()
    fixed = b"".join(lines)
    dropped = data.count(b"\n") + (0 if data.endswith(b"\n") else 1) - len(lines)
    if fixed != data:
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_bytes(fixed)
        os.replace(tmp, p)
    return dropped


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON object line of ``path`` (``[]`` if missing); ``null`` -> ``nan``.

    Lines that do not parse (a line cut short by an interrupted run) are skipped. Top-level
    ``null`` values become ``float('nan')`` so numeric series keep their length.
    """
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows
