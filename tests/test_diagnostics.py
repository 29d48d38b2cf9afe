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


def _stats(rho, old_entropy, adv, valid=None, erc=(0.95, 1.05), keep=None):
    from erc_gym.losses import ERCConfig, LossConfig, LossStats

    rho = torch.as_tensor(rho, dtype=torch.float32)
    h_old = torch.as_tensor(old_entropy, dtype=torch.float32)
    config = LossConfig(erc=None if erc is None else ERCConfig(*erc))
    return LossStats(
        loss=torch.tensor(0.0),
        log_ratio=torch.zeros_like(rho),
        advantages=torch.as_tensor(adv, dtype=torch.float32),
        valid=None if valid is None else torch.as_tensor(valid),
        entropy=rho * h_old,
        old_entropy=h_old,
        config=config,
        rho=rho,
        keep=keep,
    )


def test_clip_audit_counts_by_hand():
    from erc_gym.diagnostics import clip_audit

    on_policy = _stats([1.0] * 4, [0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.0, 0.0])
    # off-policy step: 10 tokens, old entropies 0.1 .. 1.0 (one per decile); ratio outside the
    # band at entropies 0.1, 0.2 (A = 0), 0.3 (A != 0) and 1.0 (A != 0)
    h = [0.1 * i for i in range(1, 11)]
    rho = [0.5, 0.9, 1.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.07]
    adv = [0.0, 0.0, 2.0, 1.0, -1.0, 0.5, -0.5, 0.25, -0.25, -3.0]
    off = _stats(rho, h, adv)
    keep = torch.tensor([r > 0.95 and r < 1.05 for r in rho])
    off.keep = keep
    out = clip_audit([on_policy, off], sample=20, seed=0)
    assert out["erc"] and out["band"] == [0.95, 1.05]
    assert out["by_step"] == {"n": [4, 10], "outside": [0, 4]}
    assert out["tokens"] == 10 and out["outside"] == 4
    bins = out["h_old_bins"]
    assert bins["n"] == [1] * 10
    assert bins["outside"] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert bins["n_adv"] == [0, 0] + [1] * 8
    assert bins["outside_adv"] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert bins["h_sum"] == pytest.approx(h, rel=1e-3)
    # the deciles of the 8 tokens with A != 0 alone: the outside ones are the lowest and highest
    conditional = out["h_old_adv_bins"]
    assert sum(conditional["n"]) == 8 and sum(conditional["outside"]) == 2
    assert conditional["outside"][0] == conditional["outside"][-1] == 1
    # |A| deciles of the 8 tokens with A != 0: |A| = 3 (outside) is the largest, 2 the next
    a = out["abs_adv_bins"]
    assert sum(a["n"]) == 8 and sum(a["outside"]) == 2
    assert a["outside"][-1] == 1 and a["abs_sum"][-1] == pytest.approx(3.0)
    assert "position_bins" not in out
    assert sorted(out["sample"]["h_old"]) == pytest.approx(h, rel=1e-3)
    assert sum(out["sample"]["outside"]) == 4
    # ERC off: "outside" is what ERC(0.95, 1.05) would have stopped, from the ratio alone
    off_erc = _stats(rho, h, adv, erc=None)
    on_policy_erc_off = _stats([1.0] * 4, [0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.0, 0.0], erc=None)
    would = clip_audit([on_policy_erc_off, off_erc])
    assert not would["erc"] and would["h_old_bins"]["outside"] == bins["outside"]


def test_clip_audit_positions_and_no_entropies():
    from erc_gym.diagnostics import clip_audit

    rho = torch.tensor([[1.0, 1.2, 1.0], [0.5, 1.0, 1.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([[1.0], [0.0]]).expand(2, 3)
    steps = [
        _stats(torch.ones(2, 3), torch.ones(2, 3), adv, valid),
        _stats(rho, torch.ones(2, 3), adv, valid),
    ]
    out = clip_audit(steps, positions=True)
    # positions of the tokens with A != 0 (row 0): 0, 1, 2; only position 1 is outside
    assert out["position_bins"]["n"][:4] == [1, 1, 1, 0]
    assert out["position_bins"]["outside"][:3] == [0, 1, 0]
    # equal old entropies all fall in one decile (ties go to the higher bin)
    assert out["outside"] == 2 and out["h_old_bins"]["n"] == [0] * 9 + [5]
    assert out["h_old_bins"]["outside_adv"] == [0] * 9 + [1]
    steps[1].entropy = None
    assert clip_audit(steps) is None


def test_state_audit_sees_a_top_action_swap_the_ratio_cannot():
    from erc_gym.diagnostics import state_audit
    from erc_gym.entropy import entropy_from_logits

    old = torch.tensor([[3.0, 1.0, 0.0, -1.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # state 0: the top two logits swap -- same entropy (ratio 1, inside any band), KL > 0;
    # state 1: sharpened (ratio < 0.95); state 2: unchanged
    new = torch.tensor([[1.0, 3.0, 0.0, -1.0], [6.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = state_audit(old, new, (0.95, 1.05), sample=3, seed=1)
    assert out["states"] == 3 and out["in_band"] == 2
    assert out["argmax_changed"] == 1 and out["argmax_changed_in_band"] == 1
    s = out["state_sample"]
    swapped = s["argmax_changed"].index(True)
    assert s["rho"][swapped] == pytest.approx(1.0, abs=1e-6)
    p, q = torch.softmax(old[0], -1), torch.softmax(new[0], -1)
    assert s["kl"][swapped] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-3)
    assert sorted(s["h_old"]) == pytest.approx(sorted(entropy_from_logits(old).tolist()), rel=1e-3)
    with pytest.raises(ValueError, match="one shape"):
        state_audit(old, new[:2])
