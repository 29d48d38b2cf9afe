"""Write-then-rename: a file is either its previous version or its new one, never half written.

Every file that a kill, a full disk or a second process could catch half written -- checkpoints,
``run.json``, ``config.json``, rewritten ``metrics.jsonl``, reports and figures -- goes through
:func:`atomic_write`. The new content is written to a hidden temporary file in the same folder
(``.<name>.<pid>.tmp<suffix>``: the suffix is kept for writers that insist on one, such as SB3's
``.zip``), flushed to disk and renamed over the target (:func:`os.replace`, atomic on POSIX and
Windows). A reader, or a second writer, sees the old file or the new one.

A write that fails removes its temporary file and raises an ``OSError`` that names the target
(a full disk shows in a ``write`` call, which names no file); a writer that turns the
``OSError`` of its writes into its own exception (``torch.save`` does) gets it back when it writes
to the file object of :func:`atomic_open`. One cut short by SIGKILL leaves its temporary file
behind; the next write to the same target removes such files of processes that are gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_open", "atomic_write", "merge_json"]


def _temp_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp{path.suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave its file alone
    return True


def _remove_stale(path: Path) -> None:
    """Remove temporary files of ``path`` left by writers that were killed."""
    prefix, suffix = f".{path.name}.", f".tmp{path.suffix}"
    with contextlib.suppress(OSError):
        for other in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
            pid = other.name.removeprefix(prefix).removesuffix(suffix)
            if other.name.endswith(suffix) and pid.isdigit() and not _alive(int(pid)):
                other.unlink(missing_ok=True)


def _discard(tmp: Path) -> None:
    """Remove a temporary file; a folder that cannot be written (read-only) keeps none to remove,
    and an error here must not hide the write's own."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _naming(err: OSError, path: Path, tmp: Path) -> OSError:
    """``err`` with ``path`` as its file name when it names no file or the temporary one."""
    if err.errno is not None and err.filename in (None, str(tmp), tmp):
        return OSError(err.errno, err.strerror, str(path))
    return err


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
def atomic_open(path: str | Path, *, fsync: bool = True) -> Iterator[Any]:
    """A binary file that replaces ``path`` when the ``with`` block ends without an error.

    The file form of :func:`atomic_write`, for writers that take a file object
    (``torch.save(state, f)``): a reader never sees a half-written file, and an error, a kill or a
    full disk keeps the previous ``path``.

    Raises:
        OSError: the write failed, also when the writer turned it into another exception; it
            names ``path``.
    """
    path = Path(path)
    _remove_stale(path)
    tmp = _temp_name(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            kept = _KeepsWriteErrors(f)
            try:
                yield kept
            except Exception:
                if kept.error is None:
                    raise
                raise kept.error from None
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise _naming(err, path, tmp) from err
    finally:
        _discard(tmp)


def atomic_write(
    path: str | Path, data: str | bytes | Callable[[Path], object], *, fsync: bool = True
) -> Path:
    """Replace ``path`` with new content in one step; returns ``path``.

    Args:
        path: the file to write (its folder must exist).
        data: text (UTF-8), bytes, or a writer called with the temporary path that creates the
            file there (``torch.save``, ``model.save``, ``fig.savefig``).
        fsync: flush the new content to disk before the rename (text and bytes only), so that a
            power loss cannot leave an empty file under the final name.

    Raises:
        OSError: the write failed (disk full, no permission), naming ``path``; ``path`` is
            unchanged.
    """
    path = Path(path)
    if not callable(data):
        raw = data.encode() if isinstance(data, str) else data
        with atomic_open(path, fsync=fsync) as f:
            f.write(raw)
        return path
    _remove_stale(path)
    tmp = _temp_name(path, os.getpid())
    try:
        data(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise _naming(err, path, tmp) from err
    finally:
        _discard(tmp)
    return path


def merge_json(path: str | Path, values: dict[str, Any]) -> Path:
    """Replace the JSON object in ``path`` by its keys updated with ``values`` (atomically).

    Keys that others recorded in the file stay: a run folder's ``config.json`` holds the
    trainer's settings and the experiment runner's record of the run (variant, kind, ...), and
    whichever writes first, both survive. A missing file, or one that is not a JSON object,
    counts as empty.
    """
    path = Path(path)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    merged = {**old, **values} if isinstance(old, dict) else dict(values)
    return atomic_write(path, json.dumps(merged, indent=2))
