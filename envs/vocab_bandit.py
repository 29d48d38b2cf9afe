"""VocabBandit: a contextual bandit with an LLM-sized action space and a pretrained-like prior."""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["MAX_VOCAB", "VocabBandit", "check_task", "make_prior"]

#: Largest vocabulary the env accepts (Qwen2's 151,936).
MAX_VOCAB = 151_936


def make_prior(
    vocab_size: int,
    num_contexts: int,
    reward_set_size: int,
    rng: np.random.Generator,
    *,
    sharp_fraction: float = 0.5,
    fork_width: int = 4,
    tail_scale: float = 1.0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prior logits ``(K, V)`` and the rewarded action set of each context.

    The prior imitates a pretrained language model's next-token distribution: a Zipf-like tail
    over the whole vocabulary plus, per context, either one dominant action (a "sharp",
    near-deterministic context, like most tokens of an LLM's answer) or a handful of competing
    candidates (a high-entropy "fork", like the few tokens where the reasoning branches). Exactly
    one rewarded action of each context is among the favoured candidates, so a prior-initialised
    policy starts with partial success, as RL fine-tuning starts from a distilled model.

    Returns:
        ``(prior_logits, reward_sets)``: float32 ``(K, V)`` logits and, per context, the sorted
        int64 array of rewarded actions.
    """
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    base = -tail_scale * np.log(ranks)  # Zipf(1) in logit space
    logits = np.empty((num_contexts, vocab_size), dtype=np.float32)
    reward_sets = []
    n_sharp = round(sharp_fraction * num_contexts)
    for k in range(num_contexts):
        z = rng.permutation(base) + rng.normal(0.0, 0.5, size=vocab_size)
        rewarded = rng.choice(vocab_size, size=reward_set_size, replace=False)
        if k < n_sharp:
            # one dominant action, rewarded in half of the sharp contexts: a confidently wrong
            # context is what RL has to move, and where entropy can collapse or explode
            favourite = rewarded[0] if k % 2 == 0 else _not_in(rewarded, vocab_size, rng)
            z[favourite] = z.max() + 9.0
        else:
            width = min(fork_width, vocab_size)
            candidates = [rewarded[0]]
            while len(candidates) < width:
                c = int(rng.integers(vocab_size))
                if c not in candidates:
                    candidates.append(c)
            z[np.array(candidates)] = z.max() + 3.0 + rng.normal(0.0, 0.3, size=width)
        logits[k] = z.astype(np.float32)
        reward_sets.append(np.sort(rewarded).astype(np.int64))
    return logits, reward_sets


def _not_in(excluded: np.ndarray, vocab_size: int, rng: np.random.Generator) -> int:
    if len(excluded) >= vocab_size:
        return int(excluded[0])
    while True:
        c = int(rng.integers(vocab_size))
        if c not in excluded:
            return c


def check_task(
    vocab_size: int, num_contexts: int, reward_set_size: int, sharp_fraction: float
) -> None:
    """Raise ``ValueError`` naming the argument unless the arguments describe a VocabBandit task.

    Args:
        vocab_size: ``V``, from 2 to :data:`MAX_VOCAB`.
        num_contexts: ``K`` >= 1.
        reward_set_size: rewarded actions per context, 1 to ``V - 1``.
        sharp_fraction: share of near-deterministic contexts, in [0, 1].
    """
    if not 2 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [2, {MAX_VOCAB}], got vocab_size={vocab_size}")
    if num_contexts < 1:
        raise ValueError(f"num_contexts must be >= 1, got num_contexts={num_contexts}")
    if not 1 <= reward_set_size < vocab_size:
        raise ValueError(
            f"reward_set_size must be in [1, vocab_size - 1] = [1, {vocab_size - 1}] (the "
            f"vocabulary must be larger than the task needs), got reward_set_size="
            f"{reward_set_size}"
        )
    if not 0.0 <= sharp_fraction <= 1.0:
        raise ValueError(f"sharp_fraction must be in [0, 1], got sharp_fraction={sharp_fraction}")


class VocabBandit(gym.Env[np.int64, np.int64]):
    """## Description

    A contextual bandit whose action space is as large as a language model's vocabulary. Each
    episode shows one of ``K`` contexts; the agent picks one of ``V`` actions and is rewarded if
    the action is in that context's rewarded set. The env carries a documented prior over actions
    per context (see :func:`make_prior`) that policies can start from, so that the entropy
    dynamics resemble an LLM's: near-deterministic contexts next to high-entropy forks. This is
    where PPO-clip's blind spot shows: an update moves probability between the *un-sampled*
    actions of a context, which the sampled-action ratio cannot see.

    ## Action Space

    ``Discrete(V)``.

    ## Observation Space

    ``Discrete(K)``: the context id.

    ## Rewards

    ``1.0`` if the action is in the context's rewarded set, else ``0.0``.

    ## Starting State

    A context drawn uniformly from ``range(K)`` with the env's ``np_random``.

    ## Episode End

    Every episode is one step (terminated after the action).

    ## Arguments

    * ``vocab_size`` (int, default 4096): ``V``, from 2 to 151,936.
    * ``num_contexts`` (int, default 16): ``K``.
    * ``reward_set_size`` (int, default 4): rewarded actions per context (< ``V``).
    * ``sharp_fraction`` (float, default 0.5): share of near-deterministic contexts in the prior.
    * ``task_seed`` (int, default 0): seed of the task (prior and reward sets), fixed across
      resets; the episode seed only draws contexts.
    * ``render_mode``: ``None`` or ``"ansi"``.

    Attributes for diagnostics: ``prior_logits`` ``(K, V)``, ``reward_sets`` (list of arrays),
    ``reward_mask`` ``(K, V)`` bool, ``prior_probs()`` and :meth:`expected_reward`.

    ## Version History

    * v0: initial version.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        vocab_size: int = 4096,
        num_contexts: int = 16,
        reward_set_size: int = 4,
        sharp_fraction: float = 0.5,
        task_seed: int = 0,
        render_mode: str | None = None,
    ) -> None:
        check_task(vocab_size, num_contexts, reward_set_size, sharp_fraction)
        self.vocab_size = vocab_size
        self.num_contexts = num_contexts
        self.render_mode = render_mode
        self.prior_logits, self.reward_sets = make_prior(
            vocab_size,
            num_contexts,
            reward_set_size,
            np.random.default_rng(task_seed),
            sharp_fraction=sharp_fraction,
        )
        self.reward_mask = np.zeros((num_contexts, vocab_size), dtype=bool)
        for k, s in enumerate(self.reward_sets):
            self.reward_mask[k, s] = True
        self.observation_space = spaces.Discrete(num_contexts)
        self.action_space = spaces.Discrete(vocab_size)
        self._context = 0
        self._last: tuple[int, float] | None = None

    def prior_probs(self) -> np.ndarray:
        """Softmax of the prior logits, ``(K, V)`` float64."""
        z = self.prior_logits.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def expected_reward(self, probs: np.ndarray) -> float:
        """Expected reward of a policy given as ``(K, V)`` action probabilities."""
        return float((probs * self.reward_mask).sum(axis=1).mean())

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.int64, dict[str, Any]]:
        super().reset(seed=seed)
        self._context = int(self.np_random.integers(self.num_contexts))
        self._last = None
        return np.int64(self._context), {"context": self._context}

    def step(self, action: Any) -> tuple[np.int64, float, bool, bool, dict[str, Any]]:
        a = int(np.asarray(action).item())
        if not 0 <= a < self.vocab_size:
            raise ValueError(f"action must be in [0, {self.vocab_size}), got action={a}")
        reward = float(self.reward_mask[self._context, a])
        self._last = (a, reward)
        info = {"context": self._context, "correct": bool(reward)}
        return np.int64(self._context), reward, True, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        last = "" if self._last is None else f" action={self._last[0]} reward={self._last[1]}"
        return f"context={self._context}{last}"
