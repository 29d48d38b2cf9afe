"""Worker of ``test_trl.py``'s sharded tests: ERC's exact entropies on one fixed batch.

``python trl_sharded_worker.py OUTPUT_DIR MODE``, MODE one of:

* ``single``: one plain process, the reference;
* ``fsdp2-root`` / ``fsdp2-head`` (under ``torchrun``, CPU and gloo): the trainer's model is
  sharded with FSDP2's ``fully_shard`` per decoder layer and at the root, the LM head in the root
  unit (``-root``, accelerate's transformer auto-wrap layout: the head is whole during the
  forward) or in a unit of its own (``-head``: the head is a ``DTensor`` shard when the hook
  reads it). accelerate refuses FSDP and DeepSpeed on CPU processes, hence the manual sharding;
* ``fsdp1-root`` / ``fsdp1-head`` (under ``torchrun``, CPU and gloo): the same layouts with
  FSDP (v1) ``FullyShardedDataParallel(use_orig_params=True)``; with the head in its own unit the
  exact entropy must refuse (the error is recorded instead of the results);
* ``zero3`` (under ``torchrun``, CPU and gloo): DeepSpeed ZeRO-3 (``deepspeed.initialize``, no
  parameter resident or prefetched);
* ``accelerate`` (under ``accelerate launch`` with FSDP or DeepSpeed, on GPUs): whatever the
  launcher configured; the trainer first trains two steps, so the engine wraps and shards the
  model as it does for users (``experiments/gpu/gpu_trl_sharded.py``).

``ERC_TRL_DEVICE=cuda`` runs ``single`` on the GPU.

Each process then:

1. loads the same fixed parameters on every rank (the "old" policy), runs the trainer's old pass
   on its rows of a fixed batch (H_old), loads perturbed parameters (the "current" policy) and
   runs the training pass (H, the keep mask and the ERC metrics, reduced over processes);
3. writes its rows' H_old and H, the logged ERC metrics, its local metric sums and what the
   engine looked like (distributed type, whether parameters are sharded, the LM head's type and
   shape as the exact-entropy hook found it) to ``$ERC_TRL_DUMP/rank{r}.json``.

"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from datasets import Dataset
from torch.distributed.tensor import DTensor, distribute_tensor

from erc_gym.envs.tokenizer import CharTokenizer
from erc_gym.integrations.trl import (
    ERC_METRIC_KEYS,
    OLD_ENTROPY_KEY,
    ERCGRPOConfig,
    ERCGRPOTrainer,
)
from erc_gym.llm.model import make_tiny_lm

BATCH, PROMPT, COMPLETION = 8, 5, 6
MODES = ("single", "fsdp2-root", "fsdp2-head", "fsdp1-root", "fsdp1-head", "zero3", "accelerate")


class RecordingTrainer(ERCGRPOTrainer):
    """Records the training pass's entropies, the logged metrics and the head the hook saw."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heads: list[dict[str, Any]] = []
        self.entropies: list[torch.Tensor] = []
        self.sums: list[list[float]] = []

    @contextlib.contextmanager
    def _erc_head(self, hidden_size: int) -> Iterator[Any]:
        weight = self._erc_causal_lm().get_output_embeddings().weight
        local = weight.to_local() if isinstance(weight, DTensor) else weight
        seen = {"type": type(weight).__name__, "local_numel": local.numel()}
        seen["zero3_status"] = str(getattr(weight, "ds_status", ""))
        with super()._erc_head(hidden_size) as (full, bias):
            self.heads.append({**seen, "gathered_shape": list(full.shape)})
            yield full, bias

    def _erc_train_logps(self, logps: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        self.entropies.append(entropy.detach().clone())
        return super()._erc_train_logps(logps, entropy)

    def _erc_log_metrics(self, rho: torch.Tensor, h_old: torch.Tensor, valid: torch.Tensor) -> None:
        self.sums.append(self._erc_metric_sums(rho, h_old, valid).tolist())
        super()._erc_log_metrics(rho, h_old, valid)


def fixed_batch(vocab: int) -> dict[str, torch.Tensor]:
    """The same batch on every process: prompts and completions with padding on both sides."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (BATCH, PROMPT + COMPLETION), generator=gen)
    prompt_mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    prompt_mask[::3, :2] = 0  # left padding
    lengths = torch.randint(2, COMPLETION + 1, (BATCH,), generator=gen)
    completion_mask = (torch.arange(COMPLETION)[None] < lengths[:, None]).long()
    return {
        "input_ids": ids,
        "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
        "completion_mask": completion_mask,
        "advantages": torch.randn(BATCH, generator=gen),
    }


def load_parameters(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the (possibly sharded) parameters, the same on every process."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    fsdp1 = [m for m in model.modules() if isinstance(m, FSDP)]
    with contextlib.ExitStack() as stack, torch.no_grad():
        if fsdp1:  # FSDP (v1): write through the unsharded views
            stack.enter_context(FSDP.summon_full_params(fsdp1[0], writeback=True))
        for name, param in model.named_parameters():
            full = values[name.replace("_fsdp_wrapped_module.", "")].to(param.device)
            if isinstance(param, DTensor):
                param.copy_(distribute_tensor(full, param.device_mesh, param.placements))
            elif hasattr(param, "ds_id"):  # ZeRO-3: gather, write on rank 0, re-partition
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.copy_(full)
            else:
                param.copy_(full)


def parameter_values(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Peaked, varied parameters (a random init is nearly uniform), from the initial ones."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in model.named_parameters():
        value = param.detach().clone().float()
        if seed:
            value += torch.randn(value.shape, generator=gen) * 0.02 * value.std()
        if "lm_head" in name:
            value *= 20.0
        out[name] = value
    return out


def shard_fsdp2(model: torch.nn.Module, *, own_head_unit: bool) -> None:
    """FSDP2 over all processes: one unit per decoder layer (and the head), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if own_head_unit:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)


def shard_fsdp1(model: torch.nn.Module, *, own_head_unit: bool) -> torch.nn.Module:
    """FSDP (v1) over all processes, the same units as :func:`shard_fsdp2`; returns the root."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return FSDP(module, device_id=torch.device("cpu"), use_orig_params=True)

    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = wrap(layer)
    if own_head_unit:
        model.lm_head = wrap(model.lm_head)
    return wrap(model)


def shard_zero3(model: torch.nn.Module) -> Any:
    """DeepSpeed ZeRO-3 over all processes (gloo); returns what must stay alive while it runs."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    config = {
        "train_micro_batch_size_per_gpu": 1,
        # no parameter stays resident or is prefetched: the head is partitioned (numel 0) when
        # the exact-entropy hook reads it, as for a model too large to keep it
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_max_live_parameters": 0,
        },
    }
    hf_config = HfDeepSpeedConfig(config)  # transformers' is_deepspeed_zero3_enabled() -> True
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return hf_config, engine


def compare_to_reference(ranks: list[dict[str, Any]], ref: dict[str, Any]) -> dict[str, float]:
    """Max abs differences of a sharded run's results from the one-process reference.

    ``h_old`` / ``h``: the ranks' rows, concatenated, against the reference rows (valid tokens);
    ``metrics``: the largest difference of a logged ERC metric from the reference's;
    ``ranks_disagree``: the largest difference of a logged metric between ranks.
    """
    mask = torch.tensor(ref["mask"]).bool()
    out = {}
    for key in ("h_old", "h"):
        mine = torch.tensor([row for rank in ranks for row in rank[key]])
        out[key] = float((mine - torch.tensor(ref[key]))[mask].abs().max())
    logged = [rank["logged"] for rank in ranks]
    values = torch.tensor([[log[key] for key in ERC_METRIC_KEYS] for log in logged])
    want = torch.tensor([ref["logged"][key] for key in ERC_METRIC_KEYS])
    finite = want.isfinite()
    out["metrics"] = float((values[:, finite] - want[finite]).abs().max())
    out["ranks_disagree"] = float((values[:, finite] - values[:1, finite]).abs().max())
    return out


def main() -> None:
    mode = sys.argv[2]
    if mode not in MODES:
        raise SystemExit(f"trl_sharded_worker.py: MODE must be one of {MODES}, got {mode!r}")
    tok = CharTokenizer.build()
    tok.padding_side = "left"
    model = make_tiny_lm(len(tok), tie_word_embeddings=False)
    old_values, new_values = parameter_values(model, 0), parameter_values(model, 1)
    args = ERCGRPOConfig(
        output_dir=sys.argv[1],
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=COMPLETION,
        max_steps=2,
        bf16=False,
        logging_steps=1,
        report_to="none",
        num_iterations=2,
        learning_rate=3e-2,
        seed=0,
        save_strategy="no",
        # under `accelerate launch` on GPUs, use_cpu=True would make accelerate ignore the
        # launcher's FSDP / DeepSpeed settings and fall back to DDP over CPU processes
        use_cpu=mode != "accelerate" and os.environ.get("ERC_TRL_DEVICE") != "cuda",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
        erc_low=0.98,
        erc_high=1.02,
    )
    trainer = RecordingTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [float(len(c) % 2) for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["12+3=", "4*5=", "7-2=", "9+9="] * 8}),
        processing_class=tok,
    )
    acc = trainer.accelerator
    rank, world = acc.process_index, acc.num_processes
    if mode == "accelerate" or mode == "single":
        trainer.train()
    elif mode == "zero3":
        zero3 = shard_zero3(trainer._erc_causal_lm())  # noqa: F841 (keeps ZeRO-3 enabled)
    elif mode.startswith("fsdp1"):
        trainer.model = shard_fsdp1(trainer.model, own_head_unit=mode == "fsdp1-head")
    else:
        shard_fsdp2(trainer._erc_causal_lm(), own_head_unit=mode == "fsdp2-head")
    sharded = [
        isinstance(p, DTensor) or hasattr(p, "ds_id") or getattr(p, "_fsdp_flattened", False)
        for p in trainer.model.parameters()
    ]
    train_heads = list(trainer.heads)
    trained_logged = {key: list(trainer._metrics["train"][key]) for key in ERC_METRIC_KEYS}

    # the same batch, split by rows over the processes
    batch = fixed_batch(len(tok))
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    local = {key: value[rows].to(acc.device) for key, value in batch.items()}
    net = trainer.model_wrapped if hasattr(trainer, "model_wrapped") else trainer.model
    trainer.heads.clear()
    trainer.model.eval()

    load_parameters(trainer.model, old_values)
    trainer._erc_scoring, trainer._erc_old = True, None
    try:
        with torch.no_grad():
            old_logps, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, local["input_ids"], local["attention_mask"], COMPLETION
            )
    except RuntimeError as exc:
        if mode != "fsdp1-head":
            raise
        error = {"mode": mode, "error": str(exc), "heads": trainer.heads}
        with open(os.path.join(os.environ["ERC_TRL_DUMP"], f"rank{rank}.json"), "w") as f:
            json.dump(error, f)
        return
    trainer._erc_scoring = False
    assert trainer._erc_old is not None
    h_old = trainer._erc_old[1]

    load_parameters(trainer.model, new_values)
    trainer._metrics["train"].clear()
    trainer.model.train()
    trainer._erc_batch = {
        "completion_mask": local["completion_mask"],
        OLD_ENTROPY_KEY: h_old,
        "old_per_token_logps": old_logps,
        "advantages": local["advantages"],
    }
    trainer.entropies.clear()
    with torch.no_grad():
        trainer._get_per_token_logps_and_entropies(
            trainer.model, local["input_ids"], local["attention_mask"], COMPLETION
        )
    trainer._erc_batch = None
    h_new = trainer.entropies[-1]

    out = {
        "mode": mode,
        "world": world,
        "rows": [rows.start, rows.stop],
        "distributed_type": str(acc.distributed_type),
        "is_fsdp2": bool(getattr(acc, "is_fsdp2", False)),
        "wrapper": type(net).__name__,
        "sharded_parameters": sum(sharded),
        "parameters": len(sharded),
        "train_heads": train_heads[:2],
        "heads": trainer.heads,
        "trained_logged": trained_logged,
        "h_old": h_old.cpu().tolist(),
        "h": h_new.cpu().tolist(),
        "mask": local["completion_mask"].cpu().tolist(),
        "logged": {key: trainer._metrics["train"][key][-1] for key in ERC_METRIC_KEYS},
        "sums": trainer.sums[-1],
    }
    with open(os.path.join(os.environ["ERC_TRL_DUMP"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # The results are written: leave without the interpreter's teardown, where a gloo thread
    # destroyed late can abort the process ("terminate called without an active exception"),
    # seen once in the 2-process tests on a loaded machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
