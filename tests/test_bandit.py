"""erc_gym.bandit: the rollout-drift measurement (the notebook's within-rollout figure)."""

from __future__ import annotations

import numpy as np
import pytest

from erc_gym.bandit import BanditConfig, rollout_drift, train_bandit


def test_rollout_drift_starts_on_policy_and_shapes():
    d = rollout_drift(BanditConfig(vocab_size=64, num_contexts=4, group=8, minibatches=5))
    for name in ("off", "erc"):
        assert d.entropy_ratio[name].shape == (6, 4)
        assert d.ppo_clip[name].shape == d.erc_mask[name].shape == (6, 32)
        # before the first step every ratio is 1: neither rule can stop anything
        np.testing.assert_allclose(d.entropy_ratio[name][0], 1.0, rtol=1e-6)
        assert not d.ppo_clip[name][0].any() and not d.erc_mask[name][0].any()
    assert d.band == (0.95, 1.05)
    assert d.contexts.tolist() == np.repeat(np.arange(4), 8).tolist()


def test_rollout_drift_erc_run_differs_only_after_a_mask():
    """Both runs take the same first step; they part once ERC has masked something."""
    config = BanditConfig(vocab_size=256, lr=0.2, minibatches=8, erc_low=0.99, erc_high=1.01)
    d = rollout_drift(config)
    np.testing.assert_allclose(d.entropy_ratio["off"][1], d.entropy_ratio["erc"][1])
    first_mask = int(np.argmax(d.erc_mask["erc"].any(axis=1)))
    assert first_mask >= 1 and d.erc_mask["erc"][first_mask].any()
    # the step right after the first mask is where the ERC run leaves the other one
    later = slice(first_mask + 1, None)
    assert not np.allclose(d.entropy_ratio["off"][later], d.entropy_ratio["erc"][later])
    # an ERC mask marks whole contexts: all samples of a context or none of them
    for row in d.erc_mask["erc"]:
        per_context = row.reshape(config.num_contexts, config.group)
        assert (per_context.all(axis=1) | ~per_context.any(axis=1)).all()


def test_rollout_drift_does_not_change_train_bandit():
    """The step hook is read-only: train_bandit's numbers are those of the same config."""
    config = BanditConfig(vocab_size=64, iterations=3, erc_low=0.95, erc_high=1.05)
    first = train_bandit(config)
    rollout_drift(config, warmup=1)
    assert train_bandit(config) == first


def test_rollout_drift_checks_its_config():
    with pytest.raises(ValueError, match="lr"):
        rollout_drift(BanditConfig(vocab_size=64, lr=-1.0))
