"""erc_gym.diagnostics against hand-computed cases, and the SB3 callback."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from erc_gym.diagnostics import (
    RATIO_EDGES,
    clipped_vs_kept_old_entropy,
    entropy_volatility,
    grad_norm_spikes,
    ratio_histogram,
    unsampled_drift,
)
from erc_gym.sb3 import EntropyDynamicsCallback


def test_entropy_volatility_hand_case():
    # log changes: -ln2, -ln2, +ln2 -> population std = ln2 * sqrt(8/9)
    assert entropy_volatility([1.0, 0.5, 0.25, 0.5]) == pytest.approx(
        math.log(2) * math.sqrt(8 / 9), rel=1e-12
    )
    # a steady decline has no volatility however steep it is
    assert entropy_volatility([8.0, 4.0, 2.0, 1.0]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(entropy_volatility([1.0, 0.5]))
    with pytest.raises(ValueError, match="> 0"):
        entropy_volatility([1.0, 0.0, 0.5])


def test_grad_norm_spikes_hand_case():
    norms = [1.0] * 5 + [2.9, 3.1, float("nan"), 10.0, 1.0]
    # 2.9 < 3 x median 1; 3.1 and 10 (median of the earlier values is still 1) are spikes
    assert grad_norm_spikes(norms, k=3.0, warmup=5) == 2
    assert grad_norm_spikes(norms, k=2.0, warmup=5) == 3
    assert grad_norm_spikes([100.0, 1.0, 1.0], k=3.0, warmup=5) == 0  # still warming up
    with pytest.raises(ValueError, match="k must be"):
        grad_norm_spikes(norms, k=0.0)


def test_unsampled_drift_hand_case():
    old = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    new = torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.2, 0.6]])
    sampled = torch.tensor([[True, False, False], [False, True, False]])
    # state 0: 0.5 * (|0.1 - 0.3| + |0.3 - 0.2|) = 0.15; state 1 unchanged
    assert unsampled_drift(old, new, sampled) == pytest.approx(0.075, rel=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        unsampled_drift(old, new[:1], sampled)


def test_clipped_vs_kept_old_entropy_hand_case():
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])
    clipped, kept = clipped_vs_kept_old_entropy(h, torch.tensor([True, False, True, False]))
    assert (clipped, kept) == (3.0, 2.0)
    clipped, kept = clipped_vs_kept_old_entropy(h, torch.ones(4, dtype=torch.bool))
    assert math.isnan(clipped) and kept == 2.5


def test_ratio_histogram_hand_case():
    counts = ratio_histogram(torch.tensor([0.5, 0.805, 1.0, 1.0049, 1.3, float("nan")]))
    assert len(counts) == len(RATIO_EDGES) - 1 == 40
    expected = [0] * 40
    expected[0], expected[20], expected[39] = 2, 2, 1
    assert counts == expected
    assert ratio_histogram(np.array([1.2])) == [0] * 39 + [1]


def test_callback_logs_diagnostics_for_plain_sb3_ppo(tmp_path):
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import configure

    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=4, seed=0)
    model.set_logger(configure(str(tmp_path), ["json"]))
    cb = EntropyDynamicsCallback(band=(0.9, 1.1))
    model.learn(256, callback=cb)
    rows = [json.loads(x) for x in (tmp_path / "progress.json").read_text().splitlines()]
    logged = [r for r in rows if "diagnostics/entropy" in r]
    assert len(logged) >= 2
    for r in logged:
        assert 0.0 <= r["diagnostics/outside_band"] <= 1.0
        assert r["diagnostics/entropy_ratio_min"] <= r["diagnostics/entropy_ratio_max"]
        assert 0 < r["diagnostics/entropy"] <= math.log(2) + 1e-6
        assert r["diagnostics/tv_unsampled"] >= 0
        assert sum(r["diagnostics/entropy_ratio_hist"]) == 64
    assert len(cb.entropy_history) == 4  # one per update, the last one at training end


def test_callback_rejects_continuous_actions():
    from stable_baselines3 import PPO

    model = PPO("MlpPolicy", "Pendulum-v1", n_steps=32, batch_size=32, seed=0)
    with pytest.raises(ValueError, match="Discrete"):
        model.learn(32, callback=EntropyDynamicsCallback())


def test_entropy_trend_and_jitter_separate_a_decline_from_noise():
    from erc_gym.diagnostics import entropy_jitter, entropy_steepest_fall, entropy_trend

    rng = np.random.default_rng(0)
    t = np.arange(200)
    decline = np.exp(-0.02 * t)  # a straight line in log H: slope -0.02, no jitter
    assert entropy_trend(decline) == pytest.approx(-0.02, rel=1e-9)
    assert entropy_jitter(decline) == pytest.approx(0.0, abs=1e-12)
    assert entropy_steepest_fall(decline) == pytest.approx(-0.02, rel=1e-9)
    noisy_flat = np.exp(0.05 * rng.standard_normal(200))  # no trend, log-noise s = 0.05
    assert abs(entropy_trend(noisy_flat)) < 0.002
    assert entropy_jitter(noisy_flat) == pytest.approx(0.05, rel=0.15)
    both = decline * noisy_flat  # the noise estimate does not see the decline
    assert entropy_jitter(both) == pytest.approx(entropy_jitter(noisy_flat), rel=1e-9)
    assert entropy_trend(both) == pytest.approx(-0.02, abs=0.002)
    # volatility mixes them: a decline that slows down scores as "volatile" with no noise
    slowing = np.exp(np.concatenate([-0.05 * t[:100], -5.0 - 0.001 * t[:100]]))
    assert entropy_jitter(slowing) < 0.004 < entropy_volatility(slowing)


def test_entropy_trend_jitter_edge_cases():
    from erc_gym.diagnostics import entropy_jitter, entropy_steepest_fall, entropy_trend

    assert math.isnan(entropy_trend([1.0]))
    assert math.isnan(entropy_jitter([1.0, 0.5, 0.25]))
    assert entropy_steepest_fall([1.0, 2.0, 4.0]) == 0.0
    assert entropy_steepest_fall([1.0, math.nan, 0.5, 1.0]) == pytest.approx(-math.log(2))
    with pytest.raises(ValueError, match="> 0"):
        entropy_trend([1.0, 0.0, 0.5])
