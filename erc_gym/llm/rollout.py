"""Rollouts for the LLM trainer: batched sampling with the KV cache, rewards, scoring passes.

Samples of one prompt are contiguous (a group), prompts are left-padded and responses
right-padded, and the response mask covers every generated token up to and including EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from erc_gym.entropy import linear_logprob_and_entropy, logprob_and_entropy
from erc_gym.envs.rewards import Verifier, score_completions
from erc_gym.envs.tasks import Problem

__all__ = [
    "RolloutBatch",
    "check_fused_head",
    "generate",
    "head_parameters",
    "response_logits",
    "response_logprobs",
]


@dataclass
class RolloutBatch:
    """A batch of sampled responses (row ``i`` belongs to group ``i // group_size``).

    Attributes:
        prompt_ids: ``(B, P)`` left-padded prompt token ids.
        prompt_mask: ``(B, P)`` 1 on prompt tokens, 0 on padding.
        response_ids: ``(B, R)`` sampled response token ids (padding after the end token).
        response_mask: ``(B, R)`` True on the response's tokens, the end token included.
        rewards: ``(B,)`` the verifier's reward of each response.
        prompts: the prompt texts.
        answers: the reference answers the verifier compared with.
        completions: the decoded responses.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    rewards: Tensor
    prompts: list[str]
    answers: list[str]
    completions: list[str]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, index: Tensor | Sequence[int]) -> RolloutBatch:
        """Rows ``index`` (a list or 1-D tensor of row numbers)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value[idx.to(value.device)]
            else:
                out[f.name] = [value[i] for i in idx.tolist()]
        return RolloutBatch(**out)

    @staticmethod
    def cat(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Concatenate batches, re-padding prompts (left) and responses (right)."""
        p = max(b.prompt_ids.shape[1] for b in batches)
        r = max(b.response_ids.shape[1] for b in batches)

        def left(x: Tensor, width: int, value: int) -> Tensor:
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def right(x: Tensor, width: int, value: int) -> Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return RolloutBatch(
            prompt_ids=torch.cat([left(b.prompt_ids, p, pad_id) for b in batches]),
            prompt_mask=torch.cat([left(b.prompt_mask, p, 0) for b in batches]),
            response_ids=torch.cat([right(b.response_ids, r, pad_id) for b in batches]),
            response_mask=torch.cat([right(b.response_mask.long(), r, 0) for b in batches]).bool(),
            rewards=torch.cat([b.rewards for b in batches]),
            prompts=[x for b in batches for x in b.prompts],
            answers=[x for b in batches for x in b.answers],
            completions=[x for b in batches for x in b.completions],
        )


def _left_padded_prompts(
    tokenizer: Any, prompts: Sequence[str], device: torch.device, max_prompt_tokens: int | None
) -> tuple[Tensor, Tensor]:
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    if max_prompt_tokens is not None and width > max_prompt_tokens:
        i = max(range(len(encoded)), key=lambda k: len(encoded[k]))
        raise ValueError(
            f"prompt {prompts[i]!r} has {len(encoded[i])} tokens, more than the context allows "
            f"for prompts ({max_prompt_tokens} = max_position_embeddings - max_new_tokens)"
        )
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        if e:
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    group_size: int,
    verifier: Verifier,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    max_prompt_tokens: int | None = None,
) -> RolloutBatch:
    """Sample ``group_size`` responses per problem with ``model.generate`` and score them.

    Sampling is from the full distribution (``top_k`` off) at ``temperature``, nucleus ``top_p``,
    so that the trainer's log-probabilities describe the policy that sampled. ``greedy`` decodes
    the arg-max instead (for evaluation).
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    prompts = [p["prompt"] for p in problems for _ in range(group_size)]
    answers = [p["answer"] for p in problems for _ in range(group_size)]
    prompt_ids, prompt_mask = _left_padded_prompts(tokenizer, prompts, device, max_prompt_tokens)
    gen_config = GenerationConfig(
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_p=top_p if not greedy else None,
        top_k=0 if not greedy else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config
    )
    model.train(was_training)
    response = out[:, prompt_ids.shape[1] :]
    is_eos = response == tokenizer.eos_token_id
    # a token is part of the response if no EOS came strictly before it
    before_eos = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    response_mask = before_eos == 0
    lengths = response_mask.sum(1)
    completions = [
        tokenizer.decode(response[i, : int(n)][~is_eos[i, : int(n)]], skip_special_tokens=True)
        for i, n in enumerate(lengths.tolist())
    ]
    rewards = torch.tensor(
        score_completions(completions, answers, verifier, prompts=prompts), dtype=torch.float32
    )
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response,
        response_mask=response_mask,
        rewards=rewards,
        prompts=prompts,
        answers=answers,
        completions=completions,
    )


def head_parameters(model: Any) -> dict[str, Any]:
    """The LM head of a transformers causal LM as keyword arguments of the fused head.

    Returns ``weight``, ``bias`` and the output transforms the config declares:
    ``logit_scale`` (Cohere / Command-R ``logit_scale``, Granite ``1 / logits_scaling``) and
    ``softcap`` (Gemma-2 / Gemma-3 ``final_logit_softcapping``).

    Raises:
        ValueError: if the output embedding is not an ``nn.Linear``.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"fused_head needs an nn.Linear output layer, got {type(head).__name__}; "
            f"set fused_head=False"
        )
    cfg = model.config
    scale = 1.0
    if str(getattr(cfg, "model_type", "")).startswith("cohere") and cfg.logit_scale:
        scale = float(cfg.logit_scale)  # other models' logit_scale (CLIP, MPT) means other things
    if isinstance(getattr(cfg, "logits_scaling", None), (int, float)):
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return {
        "weight": head.weight,
        "bias": head.bias,
        "logit_scale": scale,
        "softcap": None if not softcap else float(softcap),
    }


def response_logprobs(
    model: Any,
    batch: RolloutBatch,
    *,
    temperature: float = 1.0,
    fused_head: bool = False,
    entropy_grad: bool = False,
    hidden_out: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens and full-vocabulary entropies, ``(N, R)`` fp32 each.

    One forward pass. With ``fused_head`` the transformer body runs alone and
    :func:`~erc_gym.entropy.linear_logprob_and_entropy` takes its last hidden states at the
    response positions and the head's weight, so no ``(N, R, V)`` logits exist; otherwise only
    the response positions' logits are computed (``logits_to_keep``) and read without an fp32
    copy. Differentiable in ``log_prob`` (and in ``entropy`` with ``entropy_grad``, for an
    entropy bonus).

    Args:
        model: the causal LM.
        batch: prompts and responses.
        temperature: sampling temperature.
        fused_head: compute from the hidden states (see above).
        entropy_grad: let gradient flow into the entropy.
        hidden_out: with ``fused_head``, a list that receives the ``(N, R, H)`` hidden states at
            the response positions (for the exact KL penalty, :mod:`erc_gym.entropy`).

    Raises:
        ValueError: ``hidden_out`` without ``fused_head``.
    """
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask.long()], dim=1)
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    r = batch.response_ids.shape[1]
    if fused_head:
        head = head_parameters(model)
        hidden = model.base_model(
            input_ids=ids, attention_mask=attn, position_ids=position_ids
        ).last_hidden_state[:, -(r + 1) : -1]
        if hidden_out is not None:
            hidden_out.append(hidden)
        return linear_logprob_and_entropy(
            hidden,
            head.pop("weight"),
            batch.response_ids,
            temperature=temperature,
            entropy_grad=entropy_grad,
            **head,
        )
    if hidden_out is not None:
        raise ValueError("the response hidden states need fused_head=True")
    logits = model(
        input_ids=ids, attention_mask=attn, position_ids=position_ids, logits_to_keep=r + 1
    ).logits[:, :-1]
    return logprob_and_entropy(
        logits, batch.response_ids, temperature=temperature, entropy_grad=entropy_grad
    )


@torch.no_grad()
def response_logits(model: Any, batch: RolloutBatch) -> Tensor:
    """The model's logits at the response tokens of ``batch``, ``(tokens, V)`` fp32, no grad.

    Rows in order, each row's tokens under ``response_mask`` in order. For the few sequences
    whose full distributions a trainer inspects (:func:`erc_gym.diagnostics.state_audit`).
    """
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask.long()], dim=1)
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    r = batch.response_ids.shape[1]
    logits = model(
        input_ids=ids, attention_mask=attn, position_ids=position_ids, logits_to_keep=r + 1
    ).logits[:, :-1]
    return logits[batch.response_mask.to(logits.device)].float()


def check_fused_head(model: Any, batch: RolloutBatch, *, temperature: float = 1.0) -> None:
    """Compare the fused head with the model's own logits on ``batch`` (no grad).

    A model may transform its head's output in ways :func:`head_parameters` does not know (a
    custom scaling, a second projection); this catches it before training on wrong numbers.

    Raises:
        ValueError: if log-probs or entropies differ by more than 1e-3 (fp32; 0.05 for 16-bit
            weights, whose logits both paths round) on any response token.
    """
    with torch.no_grad():
        lp_f, h_f = response_logprobs(model, batch, temperature=temperature, fused_head=True)
        lp_m, h_m = response_logprobs(model, batch, temperature=temperature, fused_head=False)
    mask = batch.response_mask.to(lp_f.device)
    if not bool(mask.any()):
        return
    weight = model.get_output_embeddings().weight
    tol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 5e-2
    err = max(
        float((lp_f - lp_m).abs()[mask].max()),
        float(((h_f - h_m).abs() / (1.0 + h_m.abs()))[mask].max()),
    )
    if not err <= tol:
        raise ValueError(
            f"fused_head: log-probs/entropies from the hidden states differ by {err:.3g} from the "
            f"model's own logits ({type(model).__name__}: an output transform that "
            f"head_parameters does not know?); set fused_head=False"
        )
