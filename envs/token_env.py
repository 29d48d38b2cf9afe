"""TokenEnv: any prompt set + verifier + Hugging Face tokenizer as a token-level MDP."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from erc_gym.envs.rewards import Verifier, numeric_match, score_completions
from erc_gym.envs.tasks import Problem, make_arithmetic_problems
from erc_gym.envs.tokenizer import prepare_tokenizer

__all__ = ["TokenArithmetic", "TokenEnv"]


class TokenEnv(gym.Env[dict[str, np.ndarray], np.int64]):
    """## Description

    The token MDP that RL4LMs, TRL and verl optimise: the state is the prompt plus the tokens
    generated so far, an action is the next token id, the episode ends on EOS or at the token
    limit, and a verifier scores the decoded completion at the end. Trainers generate whole
    batches with a KV cache instead; this step-by-step form is the same MDP for teaching,
    debugging and SB3, and it scores through the same functions
    (:func:`erc_gym.envs.rewards.score_completions`).

    ## Action Space

    ``Discrete(len(tokenizer))``.

    ## Observation Space

    ``Dict(input_ids=Box(0, V - 1, (max_prompt_tokens + max_new_tokens,), int64),
    length=Box(0, max_length, (1,), int64))``: token ids right-padded with the tokenizer's pad
    id, and the number of real tokens.

    ## Rewards

    ``0`` until the end, then ``verifier(decoded_completion, answer)``. A verifier that returns
    NaN raises ``ValueError`` naming the verifier, the prompt and the completion: an RL algorithm
    (SB3) cannot learn from it -- one update turns every weight NaN. (The LLM trainer, which scores
    whole batches, drops a NaN sample and counts it instead.)

    ## Starting State

    A prompt drawn uniformly from ``prompts`` with the env's ``np_random``.

    ## Episode End

    Terminated on the tokenizer's EOS token; truncated after ``max_new_tokens`` tokens. Both are
    scored.

    ## Arguments

    * ``prompts``: a non-empty sequence of ``{"prompt": str, "answer": str}``.
    * ``verifier``: ``(completion, answer) -> float``, e.g.
      :func:`~erc_gym.envs.rewards.numeric_match`.
    * ``tokenizer``: a Hugging Face tokenizer with an EOS token (EOS also pads if it has no pad
      token, see :func:`~erc_gym.envs.tokenizer.prepare_tokenizer`).
    * ``max_new_tokens`` (int): token limit of the completion.
    * ``max_prompt_tokens`` (int or None): limit of the prompt; None takes the longest prompt.
    * ``render_mode``: ``None`` or ``"ansi"``.

    ## Version History

    * v0: initial version.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        prompts: Sequence[Problem],
        verifier: Verifier,
        tokenizer: Any,
        max_new_tokens: int,
        max_prompt_tokens: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        if len(prompts) == 0:
            raise ValueError("prompts is empty: the env needs at least one prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got max_new_tokens={max_new_tokens}")
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.verifier = verifier
        self.problems = [dict(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.vocab_size = len(tokenizer)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.prompt_ids = [self._encode_checked(p) for p in self.problems]
        longest = max(len(ids) for ids in self.prompt_ids)
        if max_prompt_tokens is not None and longest > max_prompt_tokens:
            idx = max(range(len(self.prompt_ids)), key=lambda i: len(self.prompt_ids[i]))
            raise ValueError(
                f"prompt {self.problems[idx]['prompt']!r} has {longest} tokens, more than "
                f"max_prompt_tokens={max_prompt_tokens}"
            )
        self.max_prompt_tokens = longest if max_prompt_tokens is None else max_prompt_tokens
        self.max_length = self.max_prompt_tokens + max_new_tokens
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(self.vocab_size)
        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(0, self.vocab_size - 1, (self.max_length,), np.int64),
                "length": spaces.Box(0, self.max_length, (1,), np.int64),
            }
        )
        self._index = 0
        self._generated: list[int] = []

    def _encode_checked(self, problem: Problem) -> list[int]:
        if not problem.get("prompt"):
            raise ValueError(f"empty prompt in problem {problem!r}")
        ids = list(self.tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"])
        answer = problem["answer"]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        unk = self.tokenizer.unk_token_id
        roundtrip = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        if (unk is not None and unk in answer_ids) or roundtrip != answer:
            raise ValueError(
                f"the tokenizer cannot encode the answer {answer!r} of prompt "
                f"{problem['prompt']!r} (decoded back as {roundtrip!r}); extend its alphabet"
            )
        if unk is not None and unk in ids:
            raise ValueError(f"the tokenizer cannot encode the prompt {problem['prompt']!r}")
        return ids

    @property
    def problem(self) -> Problem:
        """The current episode's prompt and answer."""
        return self.problems[self._index]

    def _obs(self) -> dict[str, np.ndarray]:
        tokens = self.prompt_ids[self._index] + self._generated
        ids = np.full(self.max_length, self.pad_id, dtype=np.int64)
        ids[: len(tokens)] = tokens
        return {"input_ids": ids, "length": np.array([len(tokens)], dtype=np.int64)}

    def completion_text(self) -> str:
        """The decoded completion so far (special tokens dropped)."""
        return self.tokenizer.decode(self._generated, skip_special_tokens=True)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self._index = int(self.np_random.integers(len(self.problems)))
        self._generated = []
        return self._obs(), {"prompt": self.problem["prompt"]}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        a = int(np.asarray(action).item())
        if not 0 <= a < self.vocab_size:
            raise ValueError(f"action must be in [0, {self.vocab_size}), got action={a}")
        terminated = a == self.eos_id
        if not terminated:
            self._generated.append(a)
        truncated = not terminated and len(self._generated) >= self.max_new_tokens
        reward = 0.0
        info: dict[str, Any] = {}
        if terminated or truncated:
            text = self.completion_text()
            reward = score_completions(
                [text], [self.problem["answer"]], self.verifier, prompts=[self.problem["prompt"]]
            )[0]
            if math.isnan(reward):
                name = getattr(self.verifier, "__name__", repr(self.verifier))
                raise ValueError(
                    f"verifier {name!r} returned NaN for prompt {self.problem['prompt']!r}, "
                    f"completion {text!r}: an RL update on a NaN reward makes every weight NaN; "
                    "return a number (e.g. 0.0 for a completion it cannot check)"
                )
            info = {"completion": text, "answer": self.problem["answer"]}
        return self._obs(), reward, terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return f"{self.problem['prompt']}{self.completion_text()}"


class TokenArithmetic(TokenEnv):
    """## Description

    :class:`TokenEnv` on generated arithmetic problems (``"12+7="`` -> ``"19"``) with a
    character-level tokenizer (:class:`~erc_gym.envs.tokenizer.CharTokenizer`) and the
    :func:`~erc_gym.envs.rewards.numeric_match` verifier.

    ## Action Space

    ``Discrete(vocab_size)`` (default: 4 special tokens + the arithmetic alphabet).

    ## Observation Space

    As :class:`TokenEnv`.

    ## Rewards

    ``1.0`` if the completion is the right integer, else ``0.0``, at the end of the episode.

    ## Starting State

    A problem drawn uniformly from the generated set.

    ## Episode End

    EOS, or ``max_new_tokens`` (default: the longest answer + 1).

    ## Arguments

    * ``num_problems`` (int, default 512), ``digits`` (int, default 1), ``ops`` (str, default
      ``"+"``), ``problem_seed`` (int, default 0): the problem set (fixed by its seed).
    * ``vocab_size`` (int or None): pad the tokenizer's vocabulary to this size (e.g. 32000).
    * ``max_new_tokens`` (int or None).
    * ``render_mode``: ``None`` or ``"ansi"``.

    ## Version History

    * v0: initial version.
    """

    ALPHABET = "0123456789+-*="

    def __init__(
        self,
        num_problems: int = 512,
        digits: int = 1,
        ops: str = "+",
        problem_seed: int = 0,
        vocab_size: int | None = None,
        max_new_tokens: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        from erc_gym.envs.tokenizer import CharTokenizer

        problems = make_arithmetic_problems(num_problems, digits=digits, ops=ops, seed=problem_seed)
        tokenizer = CharTokenizer.build(self.ALPHABET, vocab_size=vocab_size)
        longest_answer = max(len(p["answer"]) for p in problems)
        super().__init__(
            problems,
            numeric_match,
            tokenizer,
            max_new_tokens=longest_answer + 1 if max_new_tokens is None else max_new_tokens,
            render_mode=render_mode,
        )
