"""Prompt/answer data for the token environments: generated arithmetic and JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["Problem", "load_jsonl", "make_arithmetic_problems"]

#: One problem: ``{"prompt": str, "answer": str}``.
Problem = dict[str, str]


def make_arithmetic_problems(
    n: int,
    *,
    digits: int = 2,
    ops: str = "+",
    seed: int = 0,
) -> list[Problem]:
    """Generate ``n`` problems such as ``{"prompt": "12+7=", "answer": "19"}``.

    Args:
        n: number of problems.
        digits: maximum number of digits of each operand (difficulty).
        ops: operators to draw from, any of ``"+-*"``.
        seed: the generator's seed; the same seed gives the same problems.

    Returns:
        A list of problems. Subtraction is ordered so that answers are non-negative.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got digits={digits}")
    if not ops or any(op not in "+-*" for op in ops):
        raise ValueError(f"ops must be a non-empty string of '+', '-', '*', got ops={ops!r}")
    rng = np.random.default_rng(seed)
    high = 10**digits
    problems = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, high, size=2))
        op = ops[int(rng.integers(len(ops)))]
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        problems.append({"prompt": f"{a}{op}{b}=", "answer": str(value)})
    return problems


def load_jsonl(path: str | Path) -> list[Problem]:
    """Read ``{"prompt": ..., "answer": ...}`` rows from a JSONL file.

    Raises:
        ValueError: on an empty file, a line that is not JSON or a row without string ``prompt``
            and ``answer`` (the message gives the line number).
    """
    rows: list[Problem] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) for k in ("prompt", "answer")
            ):
                raise ValueError(
                    f"{path}:{lineno}: each row needs string fields 'prompt' and 'answer', "
                    f"got {line.strip()[:80]!r}"
                )
            rows.append({"prompt": row["prompt"], "answer": row["answer"]})
    if not rows:
        raise ValueError(f"{path}: no problems found (empty prompt set)")
    return rows
