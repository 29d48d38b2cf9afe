"""Per-run table of an LLM stress map, finished or not (``erc-gym report`` skips unfinished runs).

Reads ``<variant>/<seed>/{run.json, metrics.jsonl}`` below a runs folder, or a ``.tar.gz`` packed by
``experiments/gpu/gpu_llm_map.sh``, and prints one Markdown row per run: the last step logged, the
held-out accuracy at every evaluation, the entropy path (first -> last, minimum), the mean ERC and
PPO clip fractions and gradient norm over the updates, and how many steps had no update (DAPO's
filter found no group with mixed rewards).

Usage::

    python experiments/gpu/gpu_llm_map_summary.py docs/data/gpu_llm_map_h200_2026-11-28.tar.gz
"""

from __future__ import annotations

import json
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

from erc_gym.cli_args import CliParser
from erc_gym.jsonl import read_jsonl


def _mean(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return f"{statistics.mean(values):.3f}" if values else "–"


def summarize(root: Path) -> list[str]:
    lines = [
        "| variant | last step | held-out accuracy at each evaluation "
        "| entropy first -> last (min) | ERC clip | PPO clip | grad norm | updates "
        "| steps without update |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run_json in sorted(root.glob("**/run.json")):
        identity = json.loads(run_json.read_text())
        rows = read_jsonl(run_json.parent / "metrics.jsonl")
        evals = " ".join(f"{r['eval_accuracy']:.2f}" for r in rows if "eval_accuracy" in r)
        updates = [r for r in rows if "entropy" in r]
        idle = sum(1 for r in rows if "accuracy" in r and "entropy" not in r)
        ent = [r["entropy"] for r in updates]
        path = f"{ent[0]:.2f} -> {ent[-1]:.2f} ({min(ent):.2f})" if ent else "–"
        last = max((r["step"] for r in rows), default=0)
        lines.append(
            f"| {identity['variant']} | {last} | {evals} | {path} | "
            f"{_mean(updates, 'erc_clip_fraction')} | {_mean(updates, 'clip_fraction')} | "
            f"{_mean(updates, 'grad_norm')} | {len(updates)} | {idle} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", help="a runs folder or a .tar.gz from gpu_llm_map.sh")
    args = parser.parse_args(argv)
    source = Path(args.runs)
    if not source.exists():
        sys.exit(f"gpu_llm_map_summary: no such file or folder: {source}")
    if source.is_file():
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(source) as tar:
            tar.extractall(tmp, filter="data")
            print("\n".join(summarize(Path(tmp))))
    else:
        print("\n".join(summarize(source)))


if __name__ == "__main__":
    main()
