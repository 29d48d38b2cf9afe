"""Write-then-rename (erc_gym.atomic) and the run-log rewrite built on it (erc_gym.jsonl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from erc_gym.atomic import atomic_write
from erc_gym.jsonl import last_value, truncate_metrics


def test_atomic_write_replaces_or_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "run.json"
    atomic_write(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fails)
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporary file left


def test_atomic_write_keeps_the_suffix_for_writers_that_need_it(tmp_path):
    seen = []
    atomic_write(tmp_path / "checkpoint.zip", lambda tmp: (seen.append(tmp), tmp.write_text("z")))
    assert seen[0].suffix == ".zip" and seen[0].parent == tmp_path
    assert (tmp_path / "checkpoint.zip").read_text() == "z"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "checkpoint.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".checkpoint.pt.{dead}.tmp.pt"
    alive = tmp_path / f".checkpoint.pt.{os.getppid()}.tmp.pt"  # a live process: left alone
    stale.write_bytes(b"x" * 1000)
    alive.write_bytes(b"y")
    atomic_write(path, b"new")
    assert not stale.exists() and alive.exists() and path.read_bytes() == b"new"


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_truncate_metrics_keeps_lines_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"note": "no key"}, {"step": 0}, {"step": 1}, {"step": 2}, {"step": 3}]
    _write(path, rows, tail='{"step": 4, "rew')
    assert truncate_metrics(path, "step", 2) == 2  # step 3 and the torn line
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:4]
    inode = path.stat().st_ino
    assert truncate_metrics(path, "step", 2) == 0
    assert path.stat().st_ino == inode  # nothing to drop: the file is not rewritten
    assert truncate_metrics(tmp_path / "missing.jsonl", "step", 2) == 0


def test_truncate_metrics_drops_a_damaged_line_and_empty_logs_stay_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, \n{"step": 2}\n')
    assert truncate_metrics(path, "step", 5) == 1
    assert path.read_text() == '{"step": 0}\n{"step": 2}\n'
    path.write_text("")
    assert truncate_metrics(path, "step", 5) == 0 and path.read_text() == ""


def test_last_value_reads_the_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": i, "x": "y" * 100} for i in range(1000)], tail='{"step": 10')
    assert last_value(path, "step") == 999.0
    assert last_value(path, "nope") is None and last_value(tmp_path / "no", "step") is None
