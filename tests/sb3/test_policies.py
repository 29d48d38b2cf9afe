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
sys.path.insert(0, str(ROOT / "experiments" / "studies"))
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
    with pytest.raises(ValueError, match=r"vocabulary \(4\) is smaller than .* \(6\)"):
        ERCPPO("TokenLMPolicy", env, policy_kwargs=_lm_kwargs(4), **SMALL)


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


# Real checkpoints -- bf16 weights, padded embeddings, hub names, odd tokenizers.


def test_bf16_checkpoint_trains_in_float32(tmp_path: Path):
    lm = build_causal_lm(config={**TINY_LLAMA, "vocab_size": 18}).to(torch.bfloat16)
    lm.save_pretrained(tmp_path / "lm")
    model = ERCPPO(
        "TokenLMPolicy",
        "erc_gym/TokenArithmetic-v0",
        policy_kwargs={"model_name_or_path": str(tmp_path / "lm")},
        **SMALL,
    )
    loaded = model.policy.features_extractor.lm
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    torch.testing.assert_close(
        loaded.get_output_embeddings().weight, lm.get_output_embeddings().weight.float()
    )
    model.learn(32)


def test_padded_checkpoint_uses_the_env_vocabulary(tmp_path: Path):
    lm = build_causal_lm(config={**TINY_LLAMA, "vocab_size": 32})  # env has 18 tokens
    lm.save_pretrained(tmp_path / "lm")
    model = ERCPPO(
        "TokenLMPolicy",
        "erc_gym/TokenArithmetic-v0",
        policy_kwargs={"model_name_or_path": str(tmp_path / "lm")},
        **SMALL,
    )
    obs = model.env.reset()
    obs_t, _ = model.policy.obs_to_tensor(obs)
    dist = model.policy.get_distribution(obs_t)
    assert dist.distribution.logits.shape[-1] == 18
    head = model.policy.features_extractor.lm.get_output_embeddings()
    before = head.weight.detach().clone()
    model.learn(32)
    assert not torch.equal(head.weight[:18], before[:18])  # the LM's own head is trained


def test_hub_name_is_refused_without_network():
    env = make_vec_env("erc_gym/TokenSequence-v0", n_envs=1, env_kwargs=SEQ)
    with pytest.raises(FileNotFoundError, match=r"is not a local folder.*never downloads"):
        ERCPPO("TokenLMPolicy", env, policy_kwargs={"model_name_or_path": "Qwen/Qwen2.5-0.5B"})


def test_tokenizer_without_pad_pads_with_eos_and_without_eos_is_refused():
    from erc_gym.envs.rewards import numeric_match
    from erc_gym.envs.tasks import make_arithmetic_problems
    from erc_gym.envs.token_env import TokenEnv
    from erc_gym.envs.tokenizer import CharTokenizer

    problems = make_arithmetic_problems(16, seed=0)
    tok = CharTokenizer.build("0123456789+=")
    tok.pad_token = None
    assert tok.pad_token_id is None
    env = TokenEnv(problems, numeric_match, tok, max_new_tokens=3)
    assert env.pad_id == env.eos_id == tok.eos_token_id
    model = ERCPPO(
        "TokenLMPolicy", env, policy_kwargs=_lm_kwargs(len(tok)), n_steps=16, batch_size=16
    )
    model.learn(16)
    tok.eos_token = None
    with pytest.raises(ValueError, match="has no EOS token"):
        TokenEnv(problems, numeric_match, tok, max_new_tokens=3)
