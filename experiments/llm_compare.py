"""Benchmark: the LLM trainer on arithmetic -- DAPO, DAPO+ERC, GPPO, GPPO+ERC, several seeds.

Each run warm-starts the tiny model with SFT (identical per seed across variants), then trains with
RL for ``--steps`` steps, in parallel worker processes (one torch thread each). Runs write
``runs/llm_compare/<preset>/<seed>/{config.json, metrics.jsonl}`` and are skipped when finished.
The summary gives, per variant (mean over seeds): held-out accuracy at the start (= after the warm
start) and at the end, the entropy at the first and last tenth of training, the ERC clip fraction,
the mean old entropy of ERC-clipped vs kept tokens, and the grad norm.

Usage::

    python experiments/llm_compare.py --steps 600 --seeds 3      # about 4 min a run on 2 cores
    python experiments/llm_compare.py --steps 20 --seeds 1       # smoke test
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from erc_gym.cli_args import CliParser, non_negative_int, positive_float, positive_int

VARIANTS = ["tiny-arith-dapo", "tiny-arith-dapo-erc", "tiny-arith-gppo", "tiny-arith-gppo-erc"]


def run_one(preset: str, seed: int, args: dict[str, Any]) -> str:
    """Train one (preset, seed) in a worker; returns the run folder."""
    import torch

    torch.set_num_threads(1)
    from erc_gym.llm import PRESETS, ERCTrainer, TrainerConfig

    cfg = TrainerConfig(
        **PRESETS[preset],
        digits=args["digits"],
        ops=args["ops"],
        steps=args["steps"],
        sft_steps=args["sft_steps"],
        lr=args["lr"],
        eval_every=max(args["steps"] // 10, 1),
        num_eval=args["num_eval"],
        max_new_tokens=4,
        seed=seed,
        progress=False,
        run_dir=str(Path(args["root"]) / "llm_compare" / preset),
        name=str(seed),
    )
    t0 = time.perf_counter()
    ERCTrainer(cfg).train(resume=True)
    folder = Path(cfg.run_dir) / cfg.name
    (folder / "done").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return str(folder)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.mean(finite) if finite else math.nan


def summarize(root: Path, variants: list[str]) -> str:
    """Markdown table over the finished runs."""
    rows = [
        "| variant | seeds | held-out acc. start -> end (per seed) | entropy first -> last "
        "tenth | ERC clip fraction | H_old clipped / kept | PPO clip fraction | grad norm | "
        "min per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        runs = sorted(
            p for p in (root / "llm_compare" / variant).glob("*") if (p / "done").exists()
        )
        if not runs:
            continue
        starts, ends, h0, h1, erc, hc, hk, clip, gn, mins = ([] for _ in range(10))
        for run in runs:
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            evals = [ln["eval_accuracy"] for ln in lines if "eval_accuracy" in ln]
            train = [ln for ln in lines if "entropy" in ln]
            tenth = max(len(train) // 10, 1)
            starts.append(evals[0])
            ends.append(evals[-1])
            h0.append(_mean([ln["entropy"] for ln in train[:tenth]]))
            h1.append(_mean([ln["entropy"] for ln in train[-tenth:]]))
            erc.append(_mean([ln.get("erc_clip_fraction") for ln in train]))
            hc.append(_mean([ln.get("erc_clipped_entropy_old_mean") for ln in train]))
            hk.append(_mean([ln.get("erc_kept_entropy_old_mean") for ln in train]))
            clip.append(_mean([ln.get("clip_fraction") for ln in train]))
            gn.append(_mean([ln.get("grad_norm") for ln in train]))
            mins.append(float((run / "done").read_text()) / 60)
        per_seed = ", ".join(f"{a:.2f}->{b:.2f}" for a, b in zip(starts, ends, strict=True))
        rows.append(
            f"| {variant} | {len(runs)} | {_mean(starts):.3f} -> {_mean(ends):.3f} ({per_seed}) | "
            f"{_mean(h0):.3f} -> {_mean(h1):.3f} | {_mean(erc):.3f} | "
            f"{_mean(hc):.3f} / {_mean(hk):.3f} | {_mean(clip):.4f} | {_mean(gn):.3f} | "
            f"{_mean(mins):.1f} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--steps", type=positive_int, default=600, help="RL steps per run")
    parser.add_argument("--sft-steps", type=non_negative_int, default=600, help="warm-start steps")
    parser.add_argument("--lr", type=positive_float, default=1e-4)
    parser.add_argument("--digits", type=positive_int, default=2)
    parser.add_argument("--ops", default="+")
    parser.add_argument("--num-eval", type=positive_int, default=200)
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--root", default="runs")
    args = parser.parse_args(argv)
    settings = {
        k: getattr(args, k)
        for k in ("steps", "sft_steps", "lr", "digits", "ops", "num_eval", "root")
    }
    root = Path(args.root)
    jobs = [
        (v, s)
        for s in range(args.seeds)
        for v in args.variants
        if not (root / "llm_compare" / v / str(s) / "done").exists()
    ]
    print(f"{len(jobs)} runs to do on {args.workers} workers", flush=True)
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, v, s, settings) for v, s in jobs]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="runs"):
            fut.result()
    table = summarize(root, args.variants)
    (root / "llm_compare").mkdir(parents=True, exist_ok=True)
    (root / "llm_compare" / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
