"""GRPO with Entropy Ratio Clipping on TRL: a runnable example (``pip install "erc-gym[trl]"``).

By default it trains a tiny Qwen2-style model, built from a config with erc_gym's character
tokenizer (no download), on generated arithmetic problems, for a few steps on the CPU::

    python examples/trl/train_erc_grpo.py --max-steps 4

On GPUs, with a real model (a local directory, or a hub id where the machine has network)::

    accelerate launch --config_file examples/trl/accelerate_multi_gpu.yaml \
        examples/trl/train_erc_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --bf16 --max-steps 100

Every option is listed by ``--help``; ``examples/trl/README.md`` explains the ERC settings and
how they map to the paper's recipe. Metrics go to TRL's loggers (``--report-to``) and to
``<output-dir>/log_history.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local model directory or hub id (default: tiny)")
    p.add_argument("--preset", default="tiny", help="erc_gym tiny-model preset without --model")
    p.add_argument("--output-dir", default="runs/trl_erc_grpo", help="TRL output directory")
    p.add_argument("--max-steps", type=int, default=4, help="optimizer steps")
    p.add_argument("--num-problems", type=int, default=256, help="generated arithmetic problems")
    p.add_argument("--batch-size", type=int, default=8, help="per-device train batch (sequences)")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-completion-length", type=int, default=8, help="max new tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-6 for real models)")
    p.add_argument(
        "--steps-per-generation",
        type=int,
        default=4,
        help="mini-batches (optimizer steps) per generation batch; > 1 makes later ones "
        "off-policy, which is where ERC acts (the paper: 8)",
    )
    p.add_argument("--num-iterations", type=int, default=1, help="epochs over each batch")
    p.add_argument(
        "--loss",
        choices=("dapo", "gppo"),
        default="dapo",
        help="the ERC paper's two bases: DAPO (eps 0.2/0.28) or GPPO (eps 0.2/0.2); both "
        "dual-clip at 10, token-level loss, no KL",
    )
    p.add_argument("--erc-low", type=float, default=0.95, help="ERC band lower bound")
    p.add_argument("--erc-high", type=float, default=1.05, help="ERC band upper bound")
    p.add_argument("--no-erc", action="store_true", help="turn ERC off (baseline run)")
    p.add_argument(
        "--erc-entropy",
        choices=("exact", "trl"),
        default="exact",
        help="entropy for the ratio: erc_gym's exact kernel or TRL's fused-head formula",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU); default fp32")
    p.add_argument(
        "--cpu", action="store_true", help="train on the CPU (several processes talk over gloo)"
    )
    p.add_argument("--report-to", default="none", help="TRL/transformers loggers, e.g. wandb")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the run")
    return p


def digit_reward(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """Share of the answer's characters the completion gets right, position by position."""
    scores = []
    for completion, target in zip(completions, answer, strict=True):
        text = completion.strip()
        hits = sum(a == b for a, b in zip(text, target, strict=False))
        scores.append(hits / len(target) - 0.1 * max(len(text) - len(target), 0) / len(target))
    return scores


def make_config(a: argparse.Namespace) -> Any:
    from erc_gym.integrations.trl import ERCGRPOConfig

    recipe = {
        "dapo": {"epsilon": 0.2, "epsilon_high": 0.28, "erc_clip": "ppo"},
        "gppo": {"epsilon": 0.2, "epsilon_high": 0.2, "erc_clip": "gppo"},
    }[a.loss]
    return ERCGRPOConfig(
        output_dir=a.output_dir,
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch_size,
        num_generations=a.num_generations,
        max_completion_length=a.max_completion_length,
        temperature=a.temperature,
        learning_rate=a.lr,
        gradient_accumulation_steps=1,
        steps_per_generation=a.steps_per_generation,
        num_iterations=a.num_iterations,
        loss_type="dapo",
        delta=10.0,
        beta=0.0,
        erc_low=None if a.no_erc else a.erc_low,
        erc_high=None if a.no_erc else a.erc_high,
        erc_entropy=a.erc_entropy,
        bf16=a.bf16,
        use_cpu=a.cpu,
        logging_steps=1,
        save_strategy="no",
        report_to=a.report_to,
        seed=a.seed,
        **recipe,
    )


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        config = make_config(a)
    except ValueError as exc:
        print(f"train_erc_grpo.py: error: {exc}", file=sys.stderr)
        return 2

    from datasets import Dataset

    from erc_gym.envs.tasks import make_arithmetic_problems
    from erc_gym.integrations.trl import ERCGRPOTrainer

    if a.model is None:
        from erc_gym.envs.tokenizer import CharTokenizer
        from erc_gym.llm.model import make_tiny_lm

        tokenizer = CharTokenizer.build()
        model: Any = make_tiny_lm(len(tokenizer), a.preset, seed=a.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(a.model)
        model = (
            a.model if not Path(a.model).is_dir() else AutoModelForCausalLM.from_pretrained(a.model)
        )
    tokenizer.padding_side = "left"
    problems = make_arithmetic_problems(a.num_problems, seed=a.seed)
    try:  # TRL's argument checks, then ERC's (check_erc_compatible)
        trainer = ERCGRPOTrainer(
            model=model,
            reward_funcs=digit_reward,
            args=config,
            train_dataset=Dataset.from_list(problems),
            processing_class=tokenizer,
        )
    except ValueError as exc:
        print(f"train_erc_grpo.py: error: {exc}", file=sys.stderr)
        return 2
    trainer.train()
    if trainer.accelerator.is_main_process:
        out = Path(a.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
