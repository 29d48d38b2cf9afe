"""Prompt/answer data for the token environments: generated arithmetic and JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["MAX_DIGITS", "Problem", "check_arithmetic", "load_jsonl", "make_arithmetic_problems"]

#: One problem: ``{"prompt": str, "answer": str}``.
Problem = dict[str, str]
#: Most digits per operand: operands are drawn as 64-bit integers below ``10**digits``.
MAX_DIGITS = 18


def check_arithmetic(digits: int, ops: str) -> None:
    """Raise ``ValueError`` naming the setting unless ``digits`` and ``ops`` describe a task.

    Args:
        digits: maximum number of digits of each operand, 1 to :data:`MAX_DIGITS`.
        ops: a non-empty string of ``+``, ``-``, ``*``.
    """
    if not 1 <= digits <= MAX_DIGITS:
        raise ValueError(
            f"digits must be in [1, {MAX_DIGITS}] (operands are 64-bit integers), "
            f"got digits={digits}"
        )
    if not ops or any(op not in "+-*" for op in ops):
        raise ValueError(f"ops must be a non-empty string of '+', '-', '*', got ops={ops!r}")


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
    check_arithmetic(digits, ops)
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
