"""Benchmark: the cost of ERC in TRL (``ERCGRPOTrainer`` against ``GRPOTrainer``).

Trains the same model (built from a config, random init, no download) for a few steps with
``GRPOTrainer``, ``ERCGRPOTrainer(erc_entropy="trl")`` and ``ERCGRPOTrainer(erc_entropy="exact")``,
in alternating order over ``--repeats`` rounds, and reports the median of TRL's ``step_time``
(after ``--warmup`` steps) and, on CUDA, the peak allocated memory of each. Needs the ``trl``
extra. Results are printed and written to ``runs/bench_trl/<device>.json``.

Usage::

    python experiments/bench/bench_trl.py --device cpu                   # tiny model, quick check
    python experiments/bench/bench_trl.py --device cuda --preset qwen-0.5b --bf16 --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from erc_gym.cli_args import CliParser, non_negative_int, positive_int

#: Model configurations (transformers Qwen2 fields); "qwen-0.5b" has Qwen2.5-0.5B's shape.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096},
    "qwen-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                  "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936},
}  # fmt: skip


def digit_share(completions: list[str], **kwargs: Any) -> list[float]:
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def run(variant: str, a: argparse.Namespace, tokenizer: Any) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from erc_gym.envs.tasks import make_arithmetic_problems
    from erc_gym.integrations.trl import ERCGRPOConfig, ERCGRPOTrainer

    fields = {**PRESETS[a.preset], "vocab_size": len(tokenizer), "tie_word_embeddings": True}
    config = AutoConfig.for_model("qwen2", max_position_embeddings=4096, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    common: dict[str, Any] = {
        "output_dir": "runs/bench_trl/out",
        "max_steps": a.steps,
        "per_device_train_batch_size": a.batch,
        "num_generations": 8,
        "max_completion_length": a.completion_length,
        "steps_per_generation": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-6,
        "bf16": a.bf16,
        "use_cpu": a.device == "cpu",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "loss_type": "dapo",
        "epsilon_high": 0.28,
        "delta": 10.0,
    }
    if variant == "grpo":
        cls: Any = GRPOTrainer
        args: Any = GRPOConfig(**common)
    else:
        cls = ERCGRPOTrainer
        args = ERCGRPOConfig(**common, erc_low=0.95, erc_high=1.05, erc_entropy=variant)
    problems = make_arithmetic_problems(4 * a.batch * a.steps, seed=0)
    trainer = cls(
        model=model,
        reward_funcs=digit_share,
        args=args,
        train_dataset=Dataset.from_list(problems),
        processing_class=tokenizer,
    )
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = [log["step_time"] for log in trainer.state.log_history if "step_time" in log]
    out = {"step_time_median_s": statistics.median(times[a.warmup :])}
    if a.device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main(argv: list[str] | None = None) -> None:
    p = CliParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=positive_int, default=8, help="optimizer steps per run")
    p.add_argument(
        "--warmup", type=non_negative_int, default=4, help="steps left out of the median"
    )
    p.add_argument("--batch", type=positive_int, default=16, help="per-device batch (sequences)")
    p.add_argument("--completion-length", type=positive_int, default=64, help="max new tokens")
    p.add_argument("--repeats", type=positive_int, default=2, help="rounds of the three variants")
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args(argv)
    if a.warmup >= a.steps:
        p.error(f"--warmup must be < --steps, got warmup={a.warmup}, steps={a.steps}")

    from erc_gym.envs.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.build(vocab_size=PRESETS[a.preset]["vocab_size"])
    tokenizer.padding_side = "left"
    results: dict[str, list[dict[str, float]]] = {"grpo": [], "trl": [], "exact": []}
    for _ in range(a.repeats):
        for variant in results:
            results[variant].append(run(variant, a, tokenizer))
    summary: dict[str, Any] = {"args": vars(a), "torch": torch.__version__}
    base = statistics.median(r["step_time_median_s"] for r in results["grpo"])
    for variant, rows in results.items():
        t = statistics.median(r["step_time_median_s"] for r in rows)
        summary[variant] = {"step_time_median_s": t, "vs_grpo": t / base, "runs": rows}
        line = f"{variant:>6}: step {t * 1e3:8.1f} ms  x{t / base:.3f} of GRPOTrainer"
        if a.device == "cuda":
            peak = max(r["peak_memory_gib"] for r in rows)
            summary[variant]["peak_memory_gib"] = peak
            line += f"  peak {peak:.2f} GiB"
        print(line)
    out = Path("runs/bench_trl") / f"{a.device}-{a.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
