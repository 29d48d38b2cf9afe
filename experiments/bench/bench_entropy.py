"""Benchmark: erc_gym.entropy.logprob_and_entropy against the naive PyTorch formula.

Naive: ``lp = log_softmax(z); H = -(exp(lp) * lp).sum(-1); lp.gather(...)``.

Peak memory is measured in a fresh subprocess per case as the rise of the process's peak RSS
(``VmHWM``) over the RSS right after the logits were allocated and touched, so it counts every
temporary the function allocates. Time is the median of repeated calls in one process, the two
functions alternated so that machine noise hits both. Each timing is done twice: with the
machine as it is ("idle", though other users may be running) and with one extra process of ours
spinning on a core ("busy"), the condition the CPU chunk scheduling of ``erc_gym.entropy`` is
written for (env workers, data loaders or other experiments beside the training process).

Usage::

    python experiments/bench/bench_entropy.py                 # N = 4096, V in {32768, 151936}
    python experiments/bench/bench_entropy.py --tokens 1024 --vocab 32768 --repeats 3
    python experiments/bench/bench_entropy.py --conditions busy
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

from erc_gym.cli_args import CliParser, positive_int


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
    # Warm up the code path (several chunks) so that one-time setup -- library initialisation,
    # erc_gym's chunk worker threads -- is not counted.
    fn(torch.randn(256, v, dtype=getattr(torch, dtype)), torch.zeros(256, dtype=torch.long))
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


@contextlib.contextmanager
def busy_core(busy: bool) -> Iterator[None]:
    """While active, one child process keeps a core busy (a pure-Python spin loop)."""
    if not busy:
        yield
        return
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let the scheduler see it
        yield
    finally:
        spin.kill()
        spin.wait()


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


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=positive_int, default=4096, help="number of tokens N")
    parser.add_argument(
        "--vocab", type=positive_int, nargs="+", default=[32768, 151936], help="V values"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per function")
    parser.add_argument(
        "--conditions",
        nargs="+",
        default=["idle", "busy"],
        choices=["idle", "busy"],
        help="idle: the machine as it is; busy: plus one spinning process of ours",
    )
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at start"
    )
    header = (
        f"{'N':>6} {'V':>7} {'logits MiB':>10} {'condition':>9} | {'naive ms':>9} "
        f"{'erc_gym ms':>10} {'time ratio':>10} | {'naive extra MiB':>15} "
        f"{'erc_gym extra MiB':>17} {'erc_gym extra / logits':>22}"
    )
    print(header)
    mib = 1024 * 1024
    for v in args.vocab:
        mem = {k: peak_extra_memory(k, args.tokens, v, args.dtype) for k in FUNCS}
        logits_bytes = mem["naive"][1]
        for condition in args.conditions:
            with busy_core(condition == "busy"):
                t = time_both(args.tokens, v, args.dtype, args.repeats)
            print(
                f"{args.tokens:>6} {v:>7} {logits_bytes / mib:>10.0f} {condition:>9} | "
                f"{t['naive'] * 1e3:>9.1f} {t['erc_gym'] * 1e3:>10.1f} "
                f"{t['erc_gym'] / t['naive']:>9.2f}x | {mem['naive'][0] / mib:>15.1f} "
                f"{mem['erc_gym'][0] / mib:>17.1f} {mem['erc_gym'][0] / logits_bytes:>21.1%}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
