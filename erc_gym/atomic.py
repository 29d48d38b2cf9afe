"""Write-then-rename: a file is either its previous version or its new one, never half written.

Every file that a kill, a full disk or a second process could catch half written -- checkpoints,
``run.json``, ``config.json``, rewritten ``metrics.jsonl``, reports and figures -- goes through
:func:`atomic_write`. The new content is written to a hidden temporary file in the same folder
(``.<name>.<pid>.tmp<suffix>``: the suffix is kept for writers that insist on one, such as SB3's
``.zip``), flushed to disk and renamed over the target (:func:`os.replace`, atomic on POSIX and
Windows). A reader, or a second writer, sees the old file or the new one.

A write that fails removes its temporary file. One cut short by SIGKILL leaves it behind; the next
write to the same target removes such files of processes that are gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


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
        OSError: the write failed (disk full, no permission); ``path`` is unchanged.
    """
    path = Path(path)
    _remove_stale(path)
    tmp = _temp_name(path, os.getpid())
    try:
        if callable(data):
            data(tmp)
        else:
            raw = data.encode() if isinstance(data, str) else data
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
