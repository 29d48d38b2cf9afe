"""GPU device check: ERCGRPOTrainer's exact entropies under accelerate's DeepSpeed ZeRO-3 and FSDP2.

The CPU tests (``tests/integrations/test_trl.py``) shard the model by hand, because accelerate
refuses FSDP and DeepSpeed for CPU processes. This script runs the same worker
(``tests/integrations/trl_sharded_worker.py``) the way users run it: ``accelerate launch`` with
DeepSpeed ZeRO-3 and with FSDP2 on the machine's GPUs (NCCL), where ``ERCGRPOTrainer.train()``
first trains two steps with ERC on and the engine wraps the model itself. Then, on one fixed
batch at fixed parameters, the exact H_old and H and the reduced ERC metrics of each engine are
compared with one plain process on one GPU. With one GPU each engine runs as one process (ZeRO-3
still partitions every parameter to a placeholder; FSDP2 still makes them DTensors); with two or
more, as two processes.

Needs ``trl``, ``accelerate`` and ``deepspeed`` importable (on a machine without a package index,
bring them as wheels, as ``experiments/gpu/gpu_checks.sh`` does). Prints one line per engine and
writes ``summary.json`` to ``--out``; exits 1 if any difference exceeds ``--tol``.

Usage::

    python experiments/gpu/gpu_trl_sharded.py --out runs/gpu_trl_sharded
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from erc_gym.cli_args import CliParser, positive_float, positive_int

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "integrations" / "trl_sharded_worker.py"
ENGINES = {
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "false"],
    "fsdp2": [
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap",
        "Qwen2DecoderLayer",
        "--fsdp_reshard_after_forward",
        "true",
    ],
}


def run(out: Path, cmd: list[str], timeout: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ERC_TRL_DUMP": str(out), "ERC_TRL_DEVICE": "cuda"}
    with (out / "log.txt").open("w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        tail = (out / "log.txt").read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {done.returncode}:\n" + "\n".join(tail))
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_trl_sharded"))
    parser.add_argument(
        "--tol", type=positive_float, default=1e-5, help="max abs difference allowed"
    )
    parser.add_argument("--timeout", type=positive_int, default=240, help="seconds per engine run")
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(WORKER.parent))
    from trl_sharded_worker import compare_to_reference

    if not torch.cuda.is_available():
        print("gpu_trl_sharded.py: error: no CUDA device", file=sys.stderr)
        return 2
    processes = 2 if torch.cuda.device_count() >= 2 else 1
    py = sys.executable
    ref = run(args.out / "single", [py, str(WORKER), str(args.out / "single"), "single"], 600)[0]
    summary: dict = {"processes": processes, "gpu": torch.cuda.get_device_name(0)}
    failed = False
    for engine, flags in ENGINES.items():
        out = args.out / engine
        cmd = [
            py,
            "-m",
            "accelerate.commands.launch",
            *flags,
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(WORKER),
            str(out),
            "accelerate",
        ]
        try:
            ranks = run(out, cmd, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"[{engine}] FAILED: {exc}")
            summary[engine] = {"error": str(exc)}
            failed = True
            continue
        diff = compare_to_reference(ranks, ref)
        heads = ranks[0]["heads"]
        ok = max(diff.values()) <= args.tol
        failed |= not ok
        summary[engine] = {"diff": diff, "heads": heads, "type": ranks[0]["distributed_type"]}
        print(
            f"[{engine}] {ranks[0]['distributed_type']}, {ranks[0]['sharded_parameters']}/"
            f"{ranks[0]['parameters']} parameters sharded, head seen as {heads[0]}; max abs diff "
            f"H_old {diff['h_old']:.2e}, H {diff['h']:.2e}, metrics {diff['metrics']:.2e}: "
            f"{'ok' if ok else 'MISMATCH'}"
        )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
