"""Worker of ``test_trl.py::test_two_process_metrics_reduced`` (run by ``accelerate launch``).

Trains a tiny model for two steps with ERC on and writes, per rank, the ERC metric values the
trainer logged and the local (per-process) sums they were reduced from, to ``$ERC_TRL_DUMP``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from datasets import Dataset

from erc_gym.envs.tokenizer import CharTokenizer
from erc_gym.integrations.trl import ERC_METRIC_KEYS, ERCGRPOConfig, ERCGRPOTrainer
from erc_gym.llm.model import make_tiny_lm


class RecordingTrainer(ERCGRPOTrainer):
    """Keeps each micro-batch's local sums and the (reduced) values appended to the metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local_sums: list[list[float]] = []
        self.logged: dict[str, list[float]] = {key: [] for key in ERC_METRIC_KEYS}

    def _erc_log_metrics(self, rho: torch.Tensor, h_old: torch.Tensor, valid: torch.Tensor) -> None:
        self.local_sums.append(self._erc_metric_sums(rho, h_old, valid).tolist())
        super()._erc_log_metrics(rho, h_old, valid)
        for key in ERC_METRIC_KEYS:
            self.logged[key].append(self._metrics["train"][key][-1])


def main() -> None:
    tok = CharTokenizer.build()
    tok.padding_side = "left"
    prompts = ["12+3=", "4*5=", "7-2=", "9+9=", "1+1=", "8*3=", "6-4=", "5+7="]
    args = ERCGRPOConfig(
        output_dir=sys.argv[1],
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        bf16=False,
        logging_steps=1,
        report_to="none",
        num_iterations=2,
        learning_rate=3e-2,
        seed=0,
        save_strategy="no",
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        # a narrow band, so that ERC clips some tokens in two steps of a random tiny model
        erc_low=0.98,
        erc_high=1.02,
    )
    trainer = RecordingTrainer(
        model=make_tiny_lm(len(tok)),
        reward_funcs=lambda completions, **kw: [float(len(c) % 2) for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts * 4}),
        processing_class=tok,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    out = {"logged": trainer.logged, "sums": trainer.local_sums}
    with open(os.path.join(os.environ["ERC_TRL_DUMP"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    # leave together, with the process group torn down: a rank that exits while gloo's threads
    # still serve the other one can abort ("terminate called without an active exception")
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
