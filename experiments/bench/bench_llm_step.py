"""Benchmark: ERC's cost per LLM-trainer step, and the memory of the loss path (CPU, V = 32k).

Builds the tiny preset with its character tokenizer padded to 32,000 tokens, generates one batch
(16 prompts x 8 samples), then times the scoring pass and the mini-batch updates of
``ERCTrainer`` on that same batch with DAPO and DAPO+ERC, alternated. Peak memory of one update
(``VmHWM`` rise, measured in a fresh subprocess per variant) is printed next to the size of one
fp32 ``(B, T, V)`` tensor of that batch.

Usage::

    python experiments/bench/bench_llm_step.py
    python experiments/bench/bench_llm_step.py --repeats 5 --vocab 32000
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from bench_entropy import vm_hwm_bytes  # same folder: the one peak-memory probe

from erc_gym.cli_args import CliParser, positive_int


def make_trainer(erc: bool, vocab: int) -> Any:
    from erc_gym.llm import ERCTrainer, TrainerConfig

    cfg = TrainerConfig(
        vocab_size=vocab,
        sft_steps=0,
        digits=2,
        filter_groups=False,
        max_new_tokens=8,
        erc_low=0.95 if erc else None,
        erc_high=1.05 if erc else None,
        progress=False,
        run_dir="/tmp/erc_gym_bench",
        device="cpu",
    )

    def odd_length(completion: str, answer: str) -> float:
        return float(len(completion) % 2)

    return ERCTrainer(cfg, verifier=odd_length)


def memory_child(erc: bool, vocab: int) -> None:
    """Subprocess: peak memory rise of one scoring pass + update."""
    trainer = make_trainer(erc, vocab)
    batch, _ = trainer._generate_batch()
    adv = trainer._rewards_and_advantages(batch)
    trainer.score(batch.select(torch.arange(8)))  # warm-up of the code paths
    base = vm_hwm_bytes()
    old_lp, old_h = trainer.score(batch)
    trainer._train_on(batch, old_lp, old_h, adv)
    r = batch.response_ids.shape[1]
    print(
        json.dumps({"extra": vm_hwm_bytes() - base, "btv_fp32": len(batch) * (r + 1) * vocab * 4})
    )


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=positive_int, default=32_000)
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args(argv)
    # One trainer, one batch, the same starting weights for every timed update: only the loss
    # configuration differs between the variants (two model instances drift apart in their
    # weights, and with them in CPU speed, which would be measured as "ERC's cost").
    trainer = make_trainer(False, args.vocab)
    configs = {"DAPO": trainer.loss_config, "DAPO+ERC": make_trainer(True, 64).loss_config}
    batch, _ = trainer._generate_batch()
    adv = trainer._rewards_and_advantages(batch)
    n_steps = trainer.config.prompts_per_step // trainer.config.mini_batch_prompts
    start = copy.deepcopy((trainer.model.state_dict(), trainer.optimizer.state_dict()))
    gen_state = trainer.data_gen.get_state()
    times: dict[str, dict[str, list[float]]] = {k: {"score": [], "train": []} for k in configs}
    for i in range(args.repeats + 1):
        for name, config in configs.items():
            trainer.model.load_state_dict(start[0])
            trainer.optimizer.load_state_dict(start[1])
            trainer.data_gen.set_state(gen_state)
            trainer.loss_config = config
            t0 = time.perf_counter()
            old_lp, old_h = trainer.score(batch)
            t1 = time.perf_counter()
            trainer._train_on(batch, old_lp, old_h, adv)
            t2 = time.perf_counter()
            if i:  # the first round is a warm-up
                times[name]["score"].append(t1 - t0)
                times[name]["train"].append((t2 - t1) / n_steps)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, tiny preset, V = "
        f"{args.vocab}, batch {len(batch)} sequences x {batch.response_ids.shape[1]} response "
        f"tokens, {n_steps} optimiser steps per batch, {args.repeats} alternated repeats"
    )
    print(
        f"{'variant':<9} {'score pass ms':>14} {'ms / optimiser step':>20} {'peak extra MiB':>15}"
    )
    med = {}
    for name in configs:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--_child",
                "1" if name.endswith("ERC") else "0",
                str(args.vocab),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        mem = json.loads(out.strip().splitlines()[-1])
        med[name] = statistics.median(times[name]["train"])
        print(
            f"{name:<9} {statistics.median(times[name]['score']) * 1e3:>14.1f} "
            f"{med[name] * 1e3:>20.1f} {mem['extra'] / 2**20:>15.1f}"
        )
    print(
        f"ERC's extra time per optimiser step: {med['DAPO+ERC'] / med['DAPO'] - 1:+.1%}; one "
        f"fp32 (B, T, V) tensor of this batch is {mem['btv_fp32'] / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        memory_child(sys.argv[2] == "1", int(sys.argv[3]))
    else:
        main()
