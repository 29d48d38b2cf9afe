"""Every registered erc_gym env: checkers, determinism, pickling, bad input, reward agreement."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import erc_gym.envs
from erc_gym.envs.rewards import (
    exact_match,
    numeric_match,
    score_completions,
    score_token_sequences,
    sequence_match,
)
from erc_gym.envs.tasks import load_jsonl, make_arithmetic_problems
from erc_gym.envs.token_env import TokenArithmetic, TokenEnv
from erc_gym.envs.token_sequence import EOS_ID, TokenSequence
from erc_gym.envs.tokenizer import CharTokenizer
from erc_gym.envs.vocab_bandit import VocabBandit

ALL_IDS = sorted(erc_gym.envs.ENV_IDS)


def test_every_erc_gym_id_is_listed():
    registered = sorted(k for k in gym.registry if k.startswith("erc_gym/"))
    assert registered == ALL_IDS


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_gymnasium_checker(env_id):
    gym_check_env(gym.make(env_id).unwrapped, skip_render_check=False)


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_sb3_checker(env_id):
    sb3_check_env(gym.make(env_id).unwrapped, warn=True)


def _rollout(env: gym.Env, seed: int, steps: int = 30) -> list:
    trace = []
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    for _ in range(steps):
        action = env.action_space.sample()
        obs, reward, term, trunc, _ = env.step(action)
        trace.append((repr(obs), reward, term, trunc))
        if term or trunc:
            obs, _ = env.reset()
            trace.append(("reset", repr(obs)))
    return trace


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_determinism_under_seed(env_id):
    a = _rollout(gym.make(env_id), seed=123)
    b = _rollout(gym.make(env_id), seed=123)
    c = _rollout(gym.make(env_id), seed=124)
    assert a == b
    assert a != c


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_pickle_round_trip(env_id):
    env = gym.make(env_id)
    env.reset(seed=5)
    clone = pickle.loads(pickle.dumps(env))
    for _ in range(5):
        action = env.action_space.sample()
        out_a = env.step(action)
        out_b = clone.step(action)
        assert repr(out_a[:4]) == repr(out_b[:4])
        if out_a[2] or out_a[3]:
            env.reset(seed=9)
            clone.reset(seed=9)


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_ansi_render(env_id):
    env = gym.make(env_id, render_mode="ansi")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    text = env.render()
    assert isinstance(text, str) and text


# ------------------------------------------------------------------ VocabBandit


def test_vocab_bandit_prior_and_rewards():
    env = VocabBandit(vocab_size=512, num_contexts=8, reward_set_size=3)
    probs = env.prior_probs()
    assert probs.shape == (8, 512)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    entropy = -(probs * np.log(probs)).sum(1)
    assert entropy[:4].max() < 0.1 < 0.5 < entropy[4:].min()  # sharp contexts, then forks
    assert 0.0 < env.expected_reward(probs) < 1.0
    obs, _ = env.reset(seed=0)
    action = int(env.reward_sets[int(obs)][0])
    assert env.step(action)[1] == 1.0
    wrong = next(a for a in range(512) if not env.reward_mask[int(obs), a])
    env.reset(seed=0)
    assert env.step(wrong)[1] == 0.0


def test_vocab_bandit_large_vocabulary():
    env = VocabBandit(vocab_size=151_936, num_contexts=2)
    assert env.action_space.n == 151_936
    env.reset(seed=0)
    env.step(151_935)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: VocabBandit(vocab_size=4, reward_set_size=4), "vocabulary must be larger"),
        (lambda: VocabBandit(vocab_size=1), "vocab_size must be in"),
        (lambda: TokenSequence(vocab_size=2), "vocab_size must be >= 3"),
        (lambda: CharTokenizer.build("0123456789", vocab_size=8), "smaller than the 14 tokens"),
        (lambda: TokenArithmetic(vocab_size=10), "smaller than the 18 tokens"),
    ],
)
def test_vocabulary_too_small(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_empty_prompt_set():
    tok = CharTokenizer.build("0123456789+=")
    with pytest.raises(ValueError, match="prompts is empty"):
        TokenEnv([], numeric_match, tok, max_new_tokens=3)


def test_answer_the_tokenizer_cannot_encode():
    tok = CharTokenizer.build("0123456789+=")
    with pytest.raises(ValueError, match="cannot encode the answer 'x7'"):
        TokenEnv([{"prompt": "1+1=", "answer": "x7"}], exact_match, tok, max_new_tokens=3)


def test_prompt_longer_than_the_limit():
    tok = CharTokenizer.build("0123456789+=")
    problems = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "12+13=", "answer": "25"}]
    with pytest.raises(ValueError, match="'12\\+13=' has 6 tokens, more than max_prompt_tokens=5"):
        TokenEnv(problems, numeric_match, tok, max_new_tokens=3, max_prompt_tokens=5)


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_out_of_range_action(env_id):
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must be in"):
        env.step(env.action_space.n)
    with pytest.raises(ValueError, match="action must be in"):
        env.step(-1)


def test_jsonl_loader(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n\n")
    assert load_jsonl(path) == [{"prompt": "2+2=", "answer": "4"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "2+2="}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_jsonl(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty prompt set"):
        load_jsonl(empty)


def test_arithmetic_problems_are_seeded_and_correct():
    a = make_arithmetic_problems(50, digits=2, ops="+-*", seed=3)
    assert a == make_arithmetic_problems(50, digits=2, ops="+-*", seed=3)
    assert a != make_arithmetic_problems(50, digits=2, ops="+-*", seed=4)
    for p in a:
        assert eval(p["prompt"][:-1]) == int(p["answer"])  # the generator's own arithmetic
        assert int(p["answer"]) >= 0


# ------------------------------------------------------------------ tokenizer


def test_char_tokenizer_round_trip_and_save_load(tmp_path: Path):
    from transformers import AutoTokenizer

    tok = CharTokenizer.build("0123456789+=", vocab_size=32_000)
    assert len(tok) == 32_000
    ids = tok("12+7=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and tok.decode(ids) == "12+7="
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("12+7=", add_special_tokens=False)["input_ids"] == ids
    assert len(loaded) == 32_000
    assert loaded.eos_token_id == tok.eos_token_id == 2


# ------------------------------------------------------------------ trainer-env agreement


def test_arithmetic_env_and_batch_scoring_agree():
    env = TokenArithmetic(num_problems=64, digits=2)
    rng = np.random.default_rng(0)
    completions_ids, answers, env_rewards = [], [], []
    for episode in range(60):
        env.reset(seed=episode)
        answer = env.problem["answer"]
        if episode % 3 == 0:  # write the right answer, then EOS
            plan = [*env.tokenizer(answer, add_special_tokens=False)["input_ids"], env.eos_id]
        else:
            plan = list(rng.integers(0, env.vocab_size, size=env.max_new_tokens))
        generated = []
        for a in plan:
            _, reward, term, trunc, _ = env.step(int(a))
            if a != env.eos_id:
                generated.append(int(a))
            if term or trunc:
                break
        completions_ids.append(generated)
        answers.append(answer)
        env_rewards.append(reward)
    texts = env.tokenizer.batch_decode(completions_ids, skip_special_tokens=True)
    batch = score_completions(texts, answers, numeric_match)
    assert batch == env_rewards
    assert sum(env_rewards) >= 20  # the right answers were rewarded


def test_token_sequence_env_and_batch_scoring_agree():
    env = TokenSequence(vocab_size=6, prompt_length=3)
    rng = np.random.default_rng(1)
    generated_all, targets, env_rewards = [], [], []
    for episode in range(80):
        env.reset(seed=episode)
        plan = [*env.target, EOS_ID] if episode % 4 == 0 else list(rng.integers(0, 6, size=5))
        generated = []
        for a in plan:
            _, reward, term, trunc, _ = env.step(int(a))
            if a != EOS_ID:
                generated.append(int(a))
            if term or trunc:
                break
        generated_all.append(generated)
        targets.append(env.target)
        env_rewards.append(reward)
    assert score_token_sequences(generated_all, targets) == env_rewards
    assert env_rewards.count(1.0) >= 20


def test_verifiers():
    assert numeric_match(" 007 ", "7") == 1.0 and numeric_match("7a", "7") == 0.0
    assert exact_match(" ab", "ab") == 1.0
    assert sequence_match([3, 4], [3, 5]) == 0.5 and sequence_match([3, 5, 6], [3, 5]) == 2 / 3
    with pytest.raises(ValueError, match="prompt '1\\+1='"):
        score_completions(["2"], ["2"], lambda c, a: 1 / 0, prompts=["1+1="])
    assert np.isnan(score_completions(["2"], ["2"], lambda c, a: float("nan"))[0])


def test_token_env_refuses_a_nan_reward():
    """A verifier's NaN went straight to SB3: after one update every weight was NaN and the
    error surfaced later as a Categorical validation traceback."""
    tokenizer = CharTokenizer.build(list("0123456789+="))
    problems = [{"prompt": "1+1=", "answer": "2"}]

    def unsure(completion: str, answer: str) -> float:
        return float("nan")

    env = TokenEnv(problems, unsure, tokenizer, max_new_tokens=2)
    env.reset(seed=0)
    env.step(tokenizer.convert_tokens_to_ids("2"))
    with pytest.raises(ValueError, match=r"verifier 'unsure' returned NaN for prompt '1\+1='"):
        env.step(tokenizer.convert_tokens_to_ids("3"))  # the token limit: scored
