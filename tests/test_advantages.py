"""GRPO advantages, DAPO group filter and overlong penalty against hand-computed values."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from erc_gym.advantages import filter_groups, group_advantages, overlong_penalty


def test_group_advantages_hand_computed():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    adv = group_advantages(rewards, 4)
    std = statistics.stdev([1.0, 0.0, 0.0, 1.0])  # unbiased: 0.5774
    a = 0.5 / (std + 1e-6)
    expected = [a, -a, -a, a] + [0.0] * 4
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)


def test_batch_and_none_scaling():
    rewards = torch.tensor([3.0, 1.0, 0.0, 0.0])
    none = group_advantages(rewards, 2, scale="none")
    torch.testing.assert_close(none, torch.tensor([1.0, -1.0, 0.0, 0.0]))
    batch = group_advantages(rewards, 2, scale="batch")
    std = statistics.stdev([3.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(batch, none / (std + 1e-6))


@settings(max_examples=50, deadline=None)
@given(
    g=st.integers(2, 8),
    n_groups=st.integers(1, 5),
    data=st.data(),
)
def test_group_advantages_are_centred_and_scaled(g, n_groups, data):
    values = data.draw(st.lists(st.floats(-10, 10), min_size=g * n_groups, max_size=g * n_groups))
    adv = group_advantages(torch.tensor(values, dtype=torch.float64), g).reshape(n_groups, g)
    torch.testing.assert_close(
        adv.sum(1), torch.zeros(n_groups, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # each group is divided by (its unbiased std + eps): the result's std is std / (std + eps)
    raw_std = torch.tensor(values, dtype=torch.float64).reshape(n_groups, g).std(1)
    torch.testing.assert_close(
        adv.std(1, unbiased=True), raw_std / (raw_std + 1e-6), atol=1e-9, rtol=1e-9
    )


def test_filter_groups():
    scores = [1, 1, 1, 0, 1, 0, 0, 0, 0.5, 0.5]
    mask = filter_groups(scores, 2)
    assert mask.tolist() == [False, False, True, True, True, True, False, False, False, False]


def test_overlong_penalty_hand_computed():
    lengths = [10, 12, 14, 16, 20]
    pen = overlong_penalty(lengths, max_length=16, buffer_length=4, factor=0.5)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.25, -0.5, -0.5]))


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: group_advantages([1.0, 2.0, 3.0], 2), "multiple of group_size"),
        (lambda: group_advantages([1.0, 2.0], 1), "group_size must be >= 2"),
        (lambda: group_advantages([1.0, 2.0], 0), "positive integer"),
        (lambda: group_advantages([1.0, 2.0], 2, scale="std"), "scale='std'"),
        (lambda: overlong_penalty([3], 16, 0), "buffer_length"),
        (lambda: overlong_penalty([3], 16, 20), "buffer_length"),
    ],
)
def test_bad_input(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()
