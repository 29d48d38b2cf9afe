"""Outcome-reward advantage estimators and DAPO batch shaping, as pure tensor functions.

* :func:`group_advantages` -- GRPO (Shao et al. 2024, arXiv 2402.03300): each prompt is sampled
  ``G`` times and a response's advantage is its reward relative to its own group.
* :func:`filter_groups` -- DAPO dynamic sampling (Yu et al. 2025, arXiv 2503.14476): a group whose
  samples all scored the same has zero advantage everywhere and teaches nothing.
* :func:`overlong_penalty` -- DAPO's soft penalty for responses that run into the length limit.

Samples of one group are contiguous: rows ``[g * G, (g + 1) * G)`` belong to group ``g``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["filter_groups", "group_advantages", "overlong_penalty"]

AdvantageScale = Literal["group", "batch", "none"]


def _as_float_1d(name: str, values: Tensor | Sequence[float]) -> Tensor:
    t = torch.as_tensor(values)
    if t.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _groups(name: str, values: Tensor, group_size: int) -> Tensor:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if values.numel() % group_size:
        raise ValueError(
            f"len({name}) = {values.numel()} is not a multiple of group_size = {group_size}"
        )
    return values.reshape(-1, group_size)


def group_advantages(
    rewards: Tensor | Sequence[float],
    group_size: int,
    *,
    scale: AdvantageScale = "group",
    eps: float = 1e-6,
) -> Tensor:
    """GRPO advantages ``A_i = (R_i - mean_group) / (std + eps)``.

    Args:
        rewards: ``(N,)`` scalar rewards, ``N`` a multiple of ``group_size``, groups contiguous.
        group_size: samples per prompt ``G``.
        scale: ``"group"`` divides by the group's unbiased std (GRPO / DAPO); ``"batch"`` by the
            unbiased std of the whole batch (more robust when groups are small); ``"none"`` only
            centres (Dr. GRPO, arXiv 2503.20783).
        eps: added to the std, so a group whose rewards are all equal gets advantage 0.

    Returns:
        ``(N,)`` advantages (float32 or float64, as the rewards). Copy them to every token of the
        response, e.g. ``advantages[:, None]`` for ``policy_loss``.

    Raises:
        ValueError: on a bad ``scale``, a length that is not a multiple of ``group_size``, or
            ``group_size < 2`` when ``scale="group"`` (the unbiased std needs two samples).
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got scale={scale!r}")
    r = _as_float_1d("rewards", rewards)
    groups = _groups("rewards", r, group_size)
    if scale == "group" and group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 for group-normalised advantages, got {group_size}: "
            "the unbiased std of one sample is undefined (use scale='none' or a larger group)"
        )
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(dim=1, unbiased=True, keepdim=True) + eps)
    elif scale == "batch":
        std = r.std(unbiased=True) if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def filter_groups(scores: Tensor | Sequence[float], group_size: int) -> Tensor:
    """DAPO dynamic-sampling filter: which samples belong to an informative group.

    Args:
        scores: ``(N,)`` per-sample metric (accuracy or reward), groups contiguous.
        group_size: samples per prompt.

    Returns:
        ``(N,)`` boolean mask, True for every sample of a group whose scores are not all equal.
        Groups containing NaN scores count as informative unless every finite score is equal;
        drop NaN samples before calling if that matters.
    """
    s = _as_float_1d("scores", scores)
    groups = _groups("scores", s, group_size)
    finite = torch.where(torch.isnan(groups), groups.nanmean(dim=1, keepdim=True), groups)
    spread = finite.amax(dim=1) - finite.amin(dim=1)
    keep = spread > 0
    return keep.repeat_interleave(group_size)


def overlong_penalty(
    lengths: Tensor | Sequence[int],
    max_length: int,
    buffer_length: int,
    factor: float = 1.0,
) -> Tensor:
    """DAPO soft overlong punishment, added to the reward.

    ``0`` for ``L <= max_length - buffer_length``; ``((max_length - buffer_length) - L) /
    buffer_length`` in the buffer (linear from 0 to -1); ``-1`` past ``max_length``; all times
    ``factor``.

    Args:
        lengths: ``(N,)`` response lengths in tokens.
        max_length: the generation limit ``L_max``.
        buffer_length: the buffer ``L_c`` (``0 < L_c <= L_max``).
        factor: penalty scale (verl's ``penalty_factor``).

    Returns:
        ``(N,)`` float32 penalties in ``[-factor, 0]``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 0 < buffer_length <= max_length:
        raise ValueError(
            f"buffer_length must satisfy 0 < buffer_length <= max_length = {max_length}, "
            f"got {buffer_length}"
        )
    lengths_t = torch.as_tensor(lengths, dtype=torch.float32)
    start = max_length - buffer_length
    penalty = ((start - lengths_t) / buffer_length).clamp(min=-1.0, max=0.0)
    return penalty * factor
