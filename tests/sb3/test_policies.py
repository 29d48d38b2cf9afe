"""TokenLMPolicy and TokenFeaturesExtractor on the token environments."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import erc_gym.envs  # noqa: F401
from erc_gym import ERCPPO
from erc_gym.sb3 import TokenFeaturesExtractor, TokenLMPolicy
from erc_gym.sb3.policies import build_causal_lm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
from token_lm_sb3 import TINY_LLAMA, train  # noqa: E402

SMALL = {"n_steps": 32, "batch_size": 32, "n_epochs": 1, "device": "cpu", "seed": 0}
SEQ = {"vocab_size": 6, "prompt_length": 1}


def _lm_kwargs(vocab: int) -> dict:
    return {"lm_config": {**TINY_LLAMA, "vocab_size": vocab}}


def test_one_update_changes_every_lm_parameter():
    env = make_vec_env("erc_gym/TokenSequence-v0", n_envs=2, seed=0, env_kwargs=SEQ)
    model = ERCPPO(
        "TokenLMPolicy", env, policy_kwargs=_lm_kwargs(6), erc_low=0.5, erc_high=2.0, **SMALL
    )
    assert isinstance(model.policy, TokenLMPolicy)
    lm = model.policy.features_extractor.lm
    assert model.policy.action_net is lm.get_output_embeddings()
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    model.learn(64)
    unchanged = [n for n, p in lm.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged
    assert "train/erc_clip_fraction" in model.logger.name_to_value


def test_plain_sb3_ppo_with_the_policy_class():
    env = make_vec_env("erc_gym/TokenSequence-v0", n_envs=2, seed=0, env_kwargs=SEQ)
    PPO(TokenLMPolicy, env, policy_kwargs=_lm_kwargs(6), **SMALL).learn(64)


def test_arithmetic_env_by_id_and_model_directory(tmp_path: Path):
    lm = build_causal_lm(config={**TINY_LLAMA, "vocab_size": 18})
    lm.save_pretrained(tmp_path / "lm")
    model = ERCPPO(
        "TokenLMPolicy",
        "erc_gym/TokenArithmetic-v0",
        policy_kwargs={"model_name_or_path": str(tmp_path / "lm")},
        **SMALL,
    )
    loaded = model.policy.features_extractor.lm
    torch.testing.assert_close(
        loaded.get_output_embeddings().weight, lm.get_output_embeddings().weight
    )
    model.learn(32)
    model.save(tmp_path / "ercppo.zip")
    again = ERCPPO.load(tmp_path / "ercppo.zip")
    for k, v in model.policy.state_dict().items():
        assert torch.equal(v, again.policy.state_dict()[k])


def test_vocabulary_mismatch_is_reported():
    env = make_vec_env("erc_gym/TokenSequence-v0", n_envs=1, env_kwargs=SEQ)
    with pytest.raises(ValueError, match=r"vocabulary \(9\) does not match .* \(6\)"):
        ERCPPO("TokenLMPolicy", env, policy_kwargs=_lm_kwargs(9), **SMALL)


def test_missing_model_directory(tmp_path: Path):
    env = make_vec_env("erc_gym/TokenSequence-v0", n_envs=1, env_kwargs=SEQ)
    with pytest.raises(OSError):
        ERCPPO(
            "TokenLMPolicy",
            env,
            policy_kwargs={"model_name_or_path": str(tmp_path / "missing")},
            **SMALL,
        )


def test_token_features_extractor_with_multi_input_policy():
    env = make_vec_env("erc_gym/TokenSequence-v0", n_envs=2, seed=0, env_kwargs=SEQ)
    model = ERCPPO(
        "MultiInputPolicy",
        env,
        policy_kwargs={
            "features_extractor_class": TokenFeaturesExtractor,
            "features_extractor_kwargs": {"embed_dim": 16},
        },
        **SMALL,
    )
    assert isinstance(model.policy.features_extractor, TokenFeaturesExtractor)
    model.learn(64)


@pytest.mark.slow
def test_token_lm_learns_above_chance():
    res = train(steps=12_000, seed=0, erc=True, episodes=200)
    assert res["before"] < res["random"] + 0.1
    assert res["after"] > res["random"] + 0.25
