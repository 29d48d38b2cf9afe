"""The VocabBandit trainer's run folder: a damaged checkpoint."""

from __future__ import annotations

import pytest

from erc_gym.bandit import BanditConfig, train_bandit


def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path):
    """A truncated checkpoint.pt gave torch's "[Errno 22] Invalid argument", no path, no hint."""
    config = BanditConfig(vocab_size=64, num_contexts=4, iterations=2, save_every=1)
    train_bandit(config, tmp_path, max_iterations=1)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ValueError) as info:
        train_bandit(config, tmp_path)
    message = str(info.value)
    assert message.startswith(f"damaged checkpoint {ckpt} (")
    assert "delete it to start this run over from iteration 0" in message
    assert "\n" not in message
    ckpt.unlink()
    assert [line["iteration"] for line in train_bandit(config, tmp_path)] == [0, 1, 2]
