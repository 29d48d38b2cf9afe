"""Benchmark: erc_gym.entropy.logprob_and_entropy against the naive PyTorch formula.

Naive: ``lp = log_softmax(z); H = -(exp(lp) * lp).sum(-1); lp.gather(...)``.

Peak memory is measured in a fresh subprocess per case as the rise of the process's peak RSS
(``VmHWM``) over the RSS right after the logits were allocated and touched, so it counts every
temporary the function allocates. Time is the median of repeated calls in one process, the two
functions alternated so that machine noise hits both.

Usage::

    python experiments/bench_entropy.py                 # N = 4096, V in {32768, 151936}
    python experiments/bench_entropy.py --tokens 1024 --vocab 32768 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def naive(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(lp.exp() * lp).sum(-1)
    return lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy


def chunked(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from erc_gym.entropy import logprob_and_entropy

    return logprob_and_entropy(logits, labels)


FUNCS = {"naive": naive, "erc_gym": chunked}


def vm_hwm_bytes() -> int:
    """Peak resident set of this process image (VmHWM; unlike ru_maxrss it resets on exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def _memory_child(name: str, n: int, v: int, dtype: str) -> None:
    """Runs in a subprocess: prints peak extra bytes of one call of FUNCS[name]."""
    torch.set_num_threads(torch.get_num_threads())
    fn = FUNCS[name]
    # Warm up the code path on a tiny input so that library initialisation is not counted.
    fn(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))
    logits = torch.randn(n, v, dtype=getattr(torch, dtype))
    labels = torch.randint(0, v, (n,))
    base = vm_hwm_bytes()
    with torch.no_grad():
        fn(logits, labels)
    peak = vm_hwm_bytes()
    print(json.dumps({"extra": peak - base, "logits": logits.numel() * logits.element_size()}))


def peak_extra_memory(name: str, n: int, v: int, dtype: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", name, str(n), str(v), dtype],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rec = json.loads(out.strip().splitlines()[-1])
    return rec["extra"], rec["logits"]


def time_both(n: int, v: int, dtype: str, repeats: int) -> dict[str, float]:
    logits = torch.randn(n, v, dtype=getattr(torch, dtype))
    labels = torch.randint(0, v, (n,))
    times: dict[str, list[float]] = {k: [] for k in FUNCS}
    with torch.no_grad():
        for fn in FUNCS.values():  # warm-up
            fn(logits, labels)
        for _ in range(repeats):
            for name, fn in FUNCS.items():
                t0 = time.perf_counter()
                fn(logits, labels)
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="number of tokens N")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936], help="V values")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per function")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}")
    header = (
        f"{'N':>6} {'V':>7} {'logits MiB':>10} | {'naive ms':>9} {'erc_gym ms':>10} "
        f"{'time ratio':>10} | {'naive extra MiB':>15} {'erc_gym extra MiB':>17} "
        f"{'erc_gym extra / logits':>22}"
    )
    print(header)
    mib = 1024 * 1024
    for v in args.vocab:
        t = time_both(args.tokens, v, args.dtype, args.repeats)
        mem = {k: peak_extra_memory(k, args.tokens, v, args.dtype) for k in FUNCS}
        logits_bytes = mem["naive"][1]
        print(
            f"{args.tokens:>6} {v:>7} {logits_bytes / mib:>10.0f} | {t['naive'] * 1e3:>9.1f} "
            f"{t['erc_gym'] * 1e3:>10.1f} {t['erc_gym'] / t['naive']:>9.2f}x | "
            f"{mem['naive'][0] / mib:>15.1f} {mem['erc_gym'][0] / mib:>17.1f} "
            f"{mem['erc_gym'][0] / logits_bytes:>21.1%}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
