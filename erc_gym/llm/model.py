"""Models for the LLM trainer: a tiny preset built from a config, local loading, SFT warm start."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from erc_gym.envs.tasks import Problem
from erc_gym.envs.tokenizer import prepare_tokenizer

__all__ = [
    "TINY_PRESETS",
    "check_vocab",
    "load_causal_lm",
    "load_model_and_tokenizer",
    "make_tiny_lm",
    "output_vocab_size",
    "sft_warmstart",
]

#: nanoGPT-style "baby" presets: ``tiny`` and ``small`` train on a laptop CPU in minutes;
#: ``base100m`` (about 99M parameters, GPT-2-small shaped) is the GPU preset of the
#: ``stress_llm_gpu`` map. All use the task's character tokenizer as vocabulary.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    },
    "small": {
        "model_type": "qwen2",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    },
    "base100m": {
        "model_type": "qwen2",
        "hidden_size": 768,
        "intermediate_size": 2560,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    },
}


def make_tiny_lm(vocab_size: int, preset: str = "tiny", seed: int = 0, **overrides: Any) -> Any:
    """A small Qwen2-style causal LM built from a transformers config (random init, no download).

    Args:
        vocab_size: the tokenizer's vocabulary size.
        preset: ``"tiny"`` (about 0.1M parameters plus embeddings), ``"small"`` or
            ``"base100m"`` (about 99M parameters; meant for a GPU).
        seed: seed of the random initialisation.
        overrides: any config field (``hidden_size=...``, ``model_type="llama"``, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(TINY_PRESETS)}")
    fields = {**TINY_PRESETS[preset], **overrides, "vocab_size": vocab_size}
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def load_causal_lm(path: str | Path, *, dtype: torch.dtype | None = None) -> Any:
    """A transformers causal LM from a local folder, never from the model hub.

    Args:
        path: a folder written by ``save_pretrained``.
        dtype: parameter dtype after loading (e.g. ``torch.float32`` to train a bf16 checkpoint
            on a CPU); ``None`` keeps the checkpoint's.

    Raises:
        FileNotFoundError: if ``path`` is not a local folder (a hub name such as
            ``Qwen/Qwen2.5-0.5B`` is one: download it first, then pass its folder).
    """
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model {str(path)!r} is not a local folder: erc_gym loads models from local folders "
            "only and never downloads (download it yourself and pass its folder, or save one "
            "with save_pretrained)"
        )
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)


def load_model_and_tokenizer(
    path: str | Path, *, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local Hugging Face directory (offline).

    The tokenizer is checked with :func:`~erc_gym.envs.tokenizer.prepare_tokenizer` (EOS
    required; EOS pads when there is no pad token) and against the model's output layer.

    Raises:
        FileNotFoundError: if ``path`` is not a directory.
        ValueError: if the tokenizer's vocabulary does not fit the model's embedding, or the
            tokenizer has no EOS token.
    """
    from transformers import AutoTokenizer

    model = load_causal_lm(path, dtype=dtype)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
    check_vocab(model, len(tokenizer))
    return model, tokenizer


def output_vocab_size(model: Any) -> int:
    """Rows of the model's output layer (padded checkpoints have more than their tokenizer)."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_vocab(model: Any, tokenizer: Any) -> None:
    """Raise ``ValueError`` if token ids (``len(tokenizer)``, or an int) exceed the model's head.

    A head larger than the tokenizer is fine: real checkpoints (Qwen) pad the embedding to a
    multiple of 64 or 128; those rows are never sampled by a token env and cost only entropy mass.
    """
    n_tokens = tokenizer if isinstance(tokenizer, int) else len(tokenizer)
    model_vocab = output_vocab_size(model)
    if n_tokens > model_vocab:
        raise ValueError(
            f"tokenizer/model vocabulary mismatch: the tokenizer has {n_tokens} tokens but "
            f"the model's output layer has {model_vocab}"
        )


def _sft_batch(
    tokenizer: Any, problems: Sequence[Problem], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + answer + EOS`` ids, attention mask and loss mask (answer only)."""
    rows, masks = [], []
    for p in problems:
        prompt = tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(p["answer"], add_special_tokens=False)["input_ids"]
        rows.append(prompt + answer + [tokenizer.eos_token_id])
        masks.append([0] * len(prompt) + [1] * (len(answer) + 1))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), attn.to(device), loss_mask.to(device)


def sft_warmstart(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Teach the task format with supervised cross-entropy on the answers (a quick warm start).

    RL then starts from partial accuracy, as the paper starts from a distilled model. Returns the
    loss of every step. The answer tokens and the EOS are trained; prompts are context only.
    """
    from erc_gym.entropy import logprob_and_entropy

    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    iterator: Any = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="sft warm start")
    for _ in iterator:
        idx = torch.randint(len(problems), (batch_size,), generator=gen).tolist()
        ids, attn, loss_mask = _sft_batch(tokenizer, [problems[i] for i in idx], device)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        log_prob, _ = logprob_and_entropy(logits, ids[:, 1:])
        m = loss_mask[:, 1:].float()
        loss = -(log_prob * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses
