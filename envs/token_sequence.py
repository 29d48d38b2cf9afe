"""TokenSequence: a token MDP with no transformers dependency (reverse the prompt)."""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from erc_gym.envs.rewards import score_token_sequences

__all__ = ["EOS_ID", "PAD_ID", "TokenSequence"]

#: Token id of padding.
PAD_ID = 0
#: Token id that ends an episode (the end of the answer).
EOS_ID = 1
_FIRST_SYMBOL = 2


class TokenSequence(gym.Env[dict[str, np.ndarray], np.int64]):
    """## Description

    The smallest language-model-like MDP: the state is a prompt of ``prompt_length`` random
    symbols followed by the tokens emitted so far; each action emits one token; the episode ends on
    the EOS token or after ``max_new_tokens``. The task is to write the prompt reversed; a verifier
    scores the whole output at the end (:func:`erc_gym.envs.rewards.sequence_match`), as a
    verifiable-reward LLM task does.

    ## Action Space

    ``Discrete(vocab_size)``: token ids; ``0`` is padding (a valid but useless action), ``1`` is
    EOS, ``2..vocab_size-1`` are symbols.

    ## Observation Space

    ``Dict(input_ids=Box(0, vocab_size - 1, (prompt_length + max_new_tokens,), int64),
    length=Box(0, prompt_length + max_new_tokens, (1,), int64))``: the token ids, right-padded
    with ``0``, and the number of real tokens.

    ## Rewards

    ``0`` on every step but the last; at the end the fraction of positions where the output
    agrees with the reversed prompt, divided by the longer of the two lengths (``[0, 1]``).

    ## Starting State

    A prompt of ``prompt_length`` symbols drawn uniformly with the env's ``np_random``.

    ## Episode End

    Terminated when EOS is emitted; truncated after ``max_new_tokens`` tokens without EOS. Both
    are scored.

    ## Arguments

    * ``vocab_size`` (int, default 8): at least 3 (padding, EOS and one symbol).
    * ``prompt_length`` (int, default 2).
    * ``max_new_tokens`` (int, default ``prompt_length + 1``): must leave room for the answer.
    * ``render_mode``: ``None`` or ``"ansi"``.

    ## Version History

    * v0: initial version.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        vocab_size: int = 8,
        prompt_length: int = 2,
        max_new_tokens: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        if vocab_size < 3:
            raise ValueError(
                f"vocab_size must be >= 3 (padding, EOS and at least one symbol), got "
                f"vocab_size={vocab_size}"
            )
        if prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got prompt_length={prompt_length}")
        max_new_tokens = prompt_length + 1 if max_new_tokens is None else max_new_tokens
        if max_new_tokens < prompt_length:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} cannot hold the {prompt_length}-token answer"
            )
        self.vocab_size = vocab_size
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.max_length = prompt_length + max_new_tokens
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(vocab_size)
        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(0, vocab_size - 1, (self.max_length,), np.int64),
                "length": spaces.Box(0, self.max_length, (1,), np.int64),
            }
        )
        self._prompt: list[int] = []
        self._generated: list[int] = []

    @property
    def target(self) -> list[int]:
        """The answer the verifier expects for the current prompt."""
        return self._prompt[::-1]

    def _obs(self) -> dict[str, np.ndarray]:
        tokens = self._prompt + self._generated
        ids = np.full(self.max_length, PAD_ID, dtype=np.int64)
        ids[: len(tokens)] = tokens
        return {"input_ids": ids, "length": np.array([len(tokens)], dtype=np.int64)}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        symbols = self.np_random.integers(_FIRST_SYMBOL, self.vocab_size, self.prompt_length)
        self._prompt = [int(x) for x in symbols]
        self._generated = []
        return self._obs(), {"prompt": list(self._prompt)}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        a = int(np.asarray(action).item())
        if not 0 <= a < self.vocab_size:
            raise ValueError(f"action must be in [0, {self.vocab_size}), got action={a}")
        if a == EOS_ID:
            terminated, truncated = True, False
        else:
            self._generated.append(a)
            terminated, truncated = False, len(self._generated) >= self.max_new_tokens
        reward = 0.0
        info: dict[str, Any] = {}
        if terminated or truncated:
            reward = score_token_sequences([self._generated], [self.target])[0]
            info = {"generated": list(self._generated), "target": self.target}
        return self._obs(), reward, terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return f"prompt={self._prompt} -> {self._generated} (target {self.target})"
