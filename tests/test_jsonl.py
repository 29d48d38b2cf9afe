"""Strict JSON Lines: non-finite floats as null, truncated last lines survive."""

from __future__ import annotations

import errno
import json
import math
import os

import pytest

from erc_gym.atomic import atomic_open, atomic_write
from erc_gym.jsonl import append_jsonl, dumps_strict, read_jsonl, repair_jsonl


def test_nan_and_inf_are_written_as_null(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}, "e": 2})
    line = path.read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))) == {
        "a": None,
        "b": [1.0, None],
        "c": {"d": None},
        "e": 2,
    }
    row = read_jsonl(path)[0]
    assert math.isnan(row["a"]) and row["e"] == 2
    assert dumps_strict({"x": float("nan")}) == '{"x": null}'


def test_truncated_last_line_is_skipped_and_repaired(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, [{"step": 1}, {"step": 2}])
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert repair_jsonl(path) == 1
    append_jsonl(path, {"step": 3})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    assert repair_jsonl(path) == 0
    assert repair_jsonl(tmp_path / "missing.jsonl") == 0


def test_atomic_write_replaces_the_file_in_one_step(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write(path, b"first")
    atomic_write(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]  # no temporary left


def test_atomic_write_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    """ENOSPC shows in a write or flush call, which names no file: the error must name it."""
    path = tmp_path / "state.bin"
    atomic_write(path, b"good")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as info:
        atomic_write(path, b"new" * 1000)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]
    with pytest.raises(OSError) as info:
        append_jsonl(tmp_path / "m.jsonl", {"step": 1})
    assert info.value.filename == str(tmp_path / "m.jsonl")


def test_atomic_write_on_a_real_full_disk(full_disk):
    path = full_disk / "state.bin"
    atomic_write(path, b"good")
    with pytest.raises(OSError) as info:
        atomic_write(path, b"x" * 2**20)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == b"good"
    assert sorted(p.name for p in full_disk.iterdir()) == [".filler", "state.bin"]


def test_atomic_open_recovers_the_os_error_a_writer_turned_into_its_own(full_disk):
    """torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos",
    naming neither the cause nor the file."""
    import torch

    path = full_disk / "checkpoint.pt"
    with atomic_open(path) as f:
        torch.save({"step": 1}, f)
    with pytest.raises(OSError) as info, atomic_open(path) as f:
        torch.save({"step": 2, "w": torch.zeros(2**18)}, f)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert torch.load(path)["step"] == 1
    assert sorted(p.name for p in full_disk.iterdir()) == [".filler", "checkpoint.pt"]
