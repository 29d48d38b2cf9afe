"""SB3 policies for token observations: a light embedding extractor and a causal-LM policy.

Token environments (``erc_gym/TokenSequence-v0``, ``erc_gym/TokenArithmetic-v0``, any
:class:`~erc_gym.envs.token_env.TokenEnv`) observe ``Dict(input_ids=Box(int), length=Box(int))``.
SB3 would treat those ids as real numbers (or one-hot a MultiDiscrete into length x vocab
features); the classes here embed them instead.

* :class:`TokenFeaturesExtractor` -- embedding + mean pooling, for ``MultiInputPolicy`` users.
* :class:`TokenLMPolicy` -- an ``ActorCriticPolicy`` around any transformers causal LM: the actor's
  logits over the full vocabulary are the LM head at the last real position, the critic is a
  linear value head on the last hidden state.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

__all__ = [
    "CausalLMFeaturesExtractor",
    "TokenFeaturesExtractor",
    "TokenLMPolicy",
    "build_causal_lm",
]


def _check_token_space(observation_space: gym.Space) -> tuple[int, int]:
    """Vocabulary size and maximum length of a token observation space."""
    if not (
        isinstance(observation_space, spaces.Dict)
        and "input_ids" in observation_space.spaces
        and "length" in observation_space.spaces
    ):
        raise ValueError(
            f"token policies need a Dict observation space with 'input_ids' and 'length' (as the "
            f"erc_gym token envs have), got {observation_space}"
        )
    ids = observation_space.spaces["input_ids"]
    assert isinstance(ids, spaces.Box)
    return int(ids.high.max()) + 1, int(ids.shape[0])


def _ids_and_last(observations: dict[str, th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
    # SB3 casts Box observations to float; ids < 2**24 are exact in float32.
    ids = observations["input_ids"].long()
    last = (observations["length"].reshape(-1).long() - 1).clamp(min=0)
    return ids, last


class TokenFeaturesExtractor(BaseFeaturesExtractor):
    """Embedding + position embedding, mean-pooled over the real tokens.

    :param observation_space: a token Dict space (``input_ids``, ``length``).
    :param embed_dim: embedding width (= the features dimension).
    """

    def __init__(self, observation_space: gym.Space, embed_dim: int = 64) -> None:
        vocab, max_len = _check_token_space(observation_space)
        super().__init__(observation_space, features_dim=embed_dim)
        self.tokens = nn.Embedding(vocab, embed_dim)
        self.positions = nn.Embedding(max_len, embed_dim)

    def forward(self, observations: dict[str, th.Tensor]) -> th.Tensor:
        ids, last = _ids_and_last(observations)
        pos = th.arange(ids.shape[1], device=ids.device)
        real = (pos[None, :] <= last[:, None]).float()
        x = self.tokens(ids) + self.positions(pos)[None]
        return (x * real[..., None]).sum(1) / real.sum(1, keepdim=True)


def build_causal_lm(
    model_name_or_path: str | None = None, config: dict[str, Any] | None = None
) -> Any:
    """A float32 transformers causal LM from a local directory or a config dict (random init).

    ``config`` needs ``model_type`` (e.g. ``"llama"``, ``"qwen2"``) and that architecture's
    fields. Nothing is downloaded: a name that is not a local directory fails with
    ``FileNotFoundError``. Checkpoints stored in bf16/fp16 are loaded as float32, the dtype of
    SB3's observations, value head and optimiser (loading is shared with the LLM trainer:
    :func:`erc_gym.llm.model.load_causal_lm`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from erc_gym.llm.model import load_causal_lm

    if (model_name_or_path is None) == (config is None):
        raise ValueError("pass exactly one of model_name_or_path and config")
    if model_name_or_path is not None:
        return load_causal_lm(model_name_or_path, dtype=th.float32)
    assert config is not None
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


class _VocabSlice(nn.Module):
    """The LM head restricted to the first ``n`` logits (the env's tokens).

    Padded checkpoints (Qwen pads its embedding to a multiple of 64/128) have more output rows
    than the tokenizer has tokens; the env's ``Discrete(len(tokenizer))`` actions are the first
    ``n`` ids, and the padding rows are never sampled.
    """

    def __init__(self, head: nn.Module, n: int) -> None:
        super().__init__()
        self.head = head
        self.n = n

    def forward(self, hidden: th.Tensor) -> th.Tensor:
        return self.head(hidden)[..., : self.n]


class CausalLMFeaturesExtractor(BaseFeaturesExtractor):
    """Runs the LM's transformer body and returns the hidden state at the last real token.

    Observations are right-padded, so with causal attention the last real position never sees a
    padding token and no attention mask is needed.

    :param observation_space: a token Dict space.
    :param model_name_or_path: local Hugging Face model directory, or
    :param lm_config: a config dict with ``model_type`` (a fresh, randomly initialised model).
    """

    def __init__(
        self,
        observation_space: gym.Space,
        model_name_or_path: str | None = None,
        lm_config: dict[str, Any] | None = None,
    ) -> None:
        from erc_gym.llm.model import check_vocab

        vocab, _ = _check_token_space(observation_space)
        lm = build_causal_lm(model_name_or_path, lm_config)
        try:
            check_vocab(lm, vocab)
        except ValueError:
            raise ValueError(
                f"the language model's vocabulary ({lm.get_output_embeddings().weight.shape[0]}) "
                f"is smaller than the environment's action space ({vocab}); build the env's "
                "tokenizer to fit the model or resize the model"
            ) from None
        super().__init__(observation_space, features_dim=int(lm.config.hidden_size))
        self.lm: Any = lm
        self.vocab_size = vocab

    def forward(self, observations: dict[str, th.Tensor]) -> th.Tensor:
        ids, last = _ids_and_last(observations)
        hidden = self.lm.base_model(input_ids=ids).last_hidden_state
        return hidden[th.arange(ids.shape[0], device=ids.device), last]


class TokenLMPolicy(ActorCriticPolicy):
    """Actor-critic policy around a transformers causal LM, for token environments.

    The actor is the LM itself: its output layer maps the last hidden state to logits over the
    whole vocabulary (``Discrete(vocab_size)`` actions). The critic is a linear head on the same
    hidden state. Works with ``ERCPPO`` (also as the string ``"TokenLMPolicy"``) and plain SB3
    ``PPO``.

    :param observation_space: a token Dict space (``input_ids``, ``length``).
    :param action_space: ``Discrete(vocab_size)``.
    :param lr_schedule: learning-rate schedule (given by the algorithm).
    :param model_name_or_path: local model directory (loaded as float32; its output layer may be
        larger than the env's vocabulary, as padded checkpoints are: the policy then uses the
        first ``vocab_size`` logits), or
    :param lm_config: a transformers config dict with ``model_type`` (random init).
    :param kwargs: other ``ActorCriticPolicy`` arguments (``optimizer_kwargs``, ...).

    Example::

        ERCPPO("TokenLMPolicy", "erc_gym/TokenSequence-v0",
               policy_kwargs={"lm_config": {"model_type": "llama", "vocab_size": 8,
                                            "hidden_size": 32, "intermediate_size": 64,
                                            "num_hidden_layers": 1, "num_attention_heads": 2}})
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        lr_schedule: Schedule,
        model_name_or_path: str | None = None,
        lm_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(
                f"TokenLMPolicy needs Discrete(vocab_size) actions, got {action_space}"
            )
        # SB3's orthogonal re-initialisation would overwrite pretrained LM weights.
        kwargs.setdefault("ortho_init", False)
        kwargs.setdefault("net_arch", [])
        kwargs.setdefault("share_features_extractor", True)
        kwargs["features_extractor_class"] = CausalLMFeaturesExtractor
        kwargs["features_extractor_kwargs"] = {
            "model_name_or_path": model_name_or_path,
            "lm_config": lm_config,
        }
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        # The actor head is the LM's own output layer (tied to its input embedding where the
        # architecture ties them), not a fresh linear layer.
        extractor: Any = self.features_extractor
        assert isinstance(extractor, CausalLMFeaturesExtractor)
        if self.mlp_extractor.latent_dim_pi != extractor.features_dim:
            raise ValueError("TokenLMPolicy needs net_arch=[] so the LM head sees hidden states")
        head = extractor.lm.get_output_embeddings()
        n_rows = head.weight.shape[0]
        self.action_net = (
            head if n_rows == extractor.vocab_size else _VocabSlice(head, extractor.vocab_size)
        )
        self.optimizer = self.optimizer_class(
            self.parameters(),
            lr=lr_schedule(1),  # type: ignore[call-arg]
            **self.optimizer_kwargs,
        )
