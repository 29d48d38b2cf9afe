"""Strict JSON Lines: non-finite floats as null, truncated last lines survive."""

from __future__ import annotations

import json
import math

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
