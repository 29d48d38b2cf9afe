"""Verifiers: the single source of rewards for the token environments and the LLM trainer.

An environment scores its one finished episode and a trainer scores a batch of generated
completions through the same functions (:func:`score_completions`, :func:`score_token_sequences`),
so the two always agree on what a sequence is worth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = [
    "Verifier",
    "exact_match",
    "numeric_match",
    "score_completions",
    "score_token_sequences",
    "sequence_match",
]

#: A verifier maps ``(completion_text, answer)`` to a reward.
Verifier = Callable[[str, str], float]


def exact_match(completion: str, answer: str) -> float:
    """1.0 if the completion, stripped of surrounding whitespace, equals the answer."""
    return float(completion.strip() == answer.strip())


def numeric_match(completion: str, answer: str) -> float:
    """1.0 if the completion is the same integer as the answer (``"007"`` matches ``"7"``)."""
    text = completion.strip()
    try:
        return float(int(text) == int(answer.strip()))
    except ValueError:
        return 0.0


def score_completions(
    completions: Sequence[str],
    answers: Sequence[str],
    verifier: Verifier = numeric_match,
    prompts: Sequence[str] | None = None,
) -> list[float]:
    """Score a batch of decoded completions.

    Args:
        completions: decoded completions, without the EOS token.
        answers: the reference answer of each completion.
        verifier: ``(completion, answer) -> float``.
        prompts: optional prompts, only used to name the failing item in an error.

    Returns:
        One float per completion. A verifier's NaN is passed through (trainers drop and count it).

    Raises:
        ValueError: on length mismatch, a non-numeric reward, or a verifier that raises (the
            message names the prompt and the completion).
    """
    if len(completions) != len(answers):
        raise ValueError(
            f"got {len(completions)} completions but {len(answers)} answers; they must pair up"
        )
    rewards = []
    for i, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
        try:
            value = float(verifier(completion, answer))
        except Exception as exc:
            where = f"prompt {prompts[i]!r}" if prompts is not None else f"item {i}"
            raise ValueError(
                f"verifier {getattr(verifier, '__name__', verifier)!r} raised on {where}, "
                f"completion {completion!r}: {exc!r}"
            ) from exc
        if math.isinf(value):
            raise ValueError(f"verifier returned {value} for item {i}; rewards must be finite")
        rewards.append(value)
    return rewards


def sequence_match(generated: Sequence[int], target: Sequence[int]) -> float:
    """Position-wise agreement of two token sequences, in ``[0, 1]``.

    ``#{i : generated[i] == target[i]} / max(len(generated), len(target))``, so both wrong tokens
    and a wrong length cost reward.
    """
    denom = max(len(generated), len(target))
    if denom == 0:
        return 1.0
    hits = sum(int(g == t) for g, t in zip(generated, target, strict=False))
    return hits / denom


def score_token_sequences(
    generated: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
) -> list[float]:
    """Batch form of :func:`sequence_match` (generated sequences without their EOS)."""
    if len(generated) != len(targets):
        raise ValueError(f"got {len(generated)} sequences but {len(targets)} targets")
    return [sequence_match(g, t) for g, t in zip(generated, targets, strict=True)]
