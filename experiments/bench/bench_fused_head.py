"""Benchmark: log-probs and entropies from hidden states, with and without the logits in memory.

Methods, all computing ``(log p(label), H)`` for ``softmax(hidden @ W.T)``:

- ``fused``: :func:`erc_gym.entropy.linear_logprob_and_entropy` (chunks of tokens, no logits);
- ``materialised``: ``logits = hidden @ W.T`` then :func:`erc_gym.entropy.logprob_and_entropy`;
- ``trl``: TRL's fused head (``trl.kernels.chunked_logprob.ChunkedLogProbFunction``, TRL >= 1.16,
  vocabulary chunks of 32768 as TRL's trainer uses) -- only when TRL is importable;
- ``naive``: ``logits = hidden @ W.T``, ``log_softmax``, ``-(p * log p).sum()``;
- ``gemm``: the one ``hidden @ W.T`` GEMM alone, always without grad (time only). In ``fwd+bwd``
  rows it gives the *recompute floor* ``(materialised + gemm) / materialised``: a head that never
  stores the logits must compute them twice (forward, and again in the backward), so it cannot
  beat the materialised path by less than one extra GEMM; no fused head can go below that ratio.

Modes: ``fwd`` (no grad, the scoring pass) and ``fwd+bwd`` (``log_prob.sum().backward()`` into
``hidden`` and ``W``, the training pass). Time is the median of repeated calls in one process,
methods alternated so that machine noise hits all; each case is timed with the machine as it is
("idle") and with one spinning process of ours ("busy", see ``bench_entropy.busy_core``). Peak
memory is measured in a fresh subprocess per case as the rise of the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set after the inputs exist
and one small call has warmed up the code path: RSS accounting by the kernel counts every
allocation of every library, and with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``)
freed tensors leave the RSS at once.
``--trainer`` instead measures the peak memory of one ``ERCTrainer`` step with and without
``fused_head``.

Usage::

    python experiments/bench/bench_fused_head.py --quick            # N 2048, H 1024, V 32768
    python experiments/bench/bench_fused_head.py                  # the full grid (hours on 2 cores)
    python experiments/bench/bench_fused_head.py --tokens 8192 --hidden 256 --vocab 151936 \\
        --modes fwd+bwd --no-time                             # memory only
    python experiments/bench/bench_fused_head.py --trainer --vocab 32768
    python experiments/bench/bench_fused_head.py --device cuda --dtype bfloat16   # GPU grid

On CUDA the methods add ``fused_torch`` (the fused head with ``USE_TRITON = False``: cuBLAS GEMMs
and PyTorch element-wise ops, no Triton kernels); time is the median of synchronised calls and
memory is ``torch.cuda.max_memory_allocated`` over the inputs, in the same process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_entropy import busy_core, vm_hwm_bytes

from erc_gym.cli_args import CliParser, positive_int
from erc_gym.entropy import linear_logprob_and_entropy, logprob_and_entropy

Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def fused(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    return linear_logprob_and_entropy(hidden, weight, labels)


def materialised(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    return logprob_and_entropy(hidden @ weight.T, labels)


def naive(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    lp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    entropy = -(lp.exp() * lp).sum(-1)
    return lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy


def gemm(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    logits = hidden @ weight.T
    return logits, logits


def _trl_head() -> Head | None:
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError:
        return None

    def trl(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
        out = ChunkedLogProbFunction.apply(
            hidden, weight, None, labels, 1.0, 32768, None, 1.0, ("entropy",)
        )
        return out[0], out[1]

    return trl


def fused_torch(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    import erc_gym.entropy as entropy_module

    before, entropy_module.USE_TRITON = entropy_module.USE_TRITON, False
    try:
        return linear_logprob_and_entropy(hidden, weight, labels)
    finally:
        entropy_module.USE_TRITON = before


def methods(device: str = "cpu") -> dict[str, Head]:
    found: dict[str, Head] = {"fused": fused, "materialised": materialised}
    if device == "cuda":
        found["fused_torch"] = fused_torch
    trl = _trl_head()
    if trl is not None:
        found["trl"] = trl
    found["naive"] = naive
    found["gemm"] = gemm
    return found


def inputs(
    n: int, h: int, v: int, dtype: str, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, generator=g, device=device).to(dt)
    weight = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dt)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    return hidden, weight, labels


def call(fn: Head, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mode: str):
    if mode == "fwd":
        with torch.no_grad():
            fn(hidden, weight, labels)
        return
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    log_prob, _ = fn(hidden, weight, labels)
    log_prob.sum().backward()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_peak_extra_memory(name: str, mode: str, n: int, h: int, v: int, dtype: str) -> int:
    """Peak CUDA memory of one call above what its inputs hold (in this process)."""
    fn = methods("cuda")[name]
    hidden, weight, labels = inputs(n, h, v, dtype, device="cuda")
    call(fn, hidden[:64], weight, labels[:64], mode)  # warm-up: kernels compiled, handles made
    _sync("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call(fn, hidden, weight, labels, mode)
    _sync("cuda")
    return torch.cuda.max_memory_allocated() - base


def _memory_child(name: str, mode: str, n: int, h: int, v: int, dtype: str) -> None:
    """Runs in a subprocess: prints the peak extra bytes of one call."""
    fn = methods()[name]
    call(fn, *inputs(64, h, v, dtype, seed=1), mode)  # warm-up: library and worker setup
    hidden, weight, labels = inputs(n, h, v, dtype)
    base = reset_peak_rss()
    call(fn, hidden, weight, labels, mode)
    print(json.dumps({"extra": vm_hwm_bytes() - base}))


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux ``clear_refs``) and return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


#: Children run with a fixed glibc mmap threshold: every large tensor is its own mapping, so the
#: RSS follows the live tensors instead of freed heap memory kept for reuse.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_extra_memory(name: str, mode: str, n: int, h: int, v: int, dtype: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", name, mode, str(n), str(h), str(v), dtype],
        check=True,
        capture_output=True,
        text=True,
        env=CHILD_ENV,
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["extra"])


def time_all(
    names: list[str],
    n: int,
    h: int,
    v: int,
    dtype: str,
    mode: str,
    repeats: int,
    device: str = "cpu",
) -> dict[str, float]:
    hidden, weight, labels = inputs(n, h, v, dtype, device=device)
    found = {k: f for k, f in methods(device).items() if k in names}
    times: dict[str, list[float]] = {k: [] for k in found}
    modes = {k: "fwd" if k == "gemm" else mode for k in found}  # the GEMM has no backward
    for name, fn in found.items():  # warm-up
        call(fn, hidden[:256], weight, labels[:256], modes[name])
        if device == "cuda":
            call(fn, hidden, weight, labels, modes[name])
    for _ in range(repeats):
        for name, fn in found.items():
            _sync(device)
            t0 = time.perf_counter()
            call(fn, hidden, weight, labels, modes[name])
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def _trainer_child(vocab: int, fused_head: bool) -> None:
    import tempfile

    from erc_gym.llm import ERCTrainer, TrainerConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainerConfig(
            vocab_size=vocab,
            sft_steps=0,
            steps=1,
            prompts_per_step=8,
            mini_batch_prompts=2,
            group_size=8,
            max_new_tokens=16,
            filter_groups=False,
            progress=False,
            device="cpu",
            run_dir=tmp,
            fused_head=fused_head,
        )
        trainer = ERCTrainer(cfg, verifier=lambda c, a: float(len(c) % 2))
        trainer.train_step()  # warm-up: first-call allocations
        base = reset_peak_rss()
        trainer.train_step()
        print(json.dumps({"extra": vm_hwm_bytes() - base}))


def trainer_memory(vocab: int) -> None:
    mib = 1024 * 1024
    print(f"ERCTrainer tiny preset, V={vocab}, 64 sequences x 16 new tokens, 1 step after warm-up")
    for flag in (False, True):
        out = subprocess.run(
            [sys.executable, __file__, "--_trainer", str(vocab), str(int(flag))],
            check=True,
            capture_output=True,
            text=True,
            env=CHILD_ENV,
        ).stdout
        extra = json.loads(out.strip().splitlines()[-1])["extra"]
        print(f"  fused_head={flag!s:5}: peak extra memory of a step {extra / mib:8.1f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokens", type=positive_int, nargs="+", default=[2048, 8192], help="N values"
    )
    parser.add_argument(
        "--hidden", type=positive_int, nargs="+", default=[1024, 2048], help="H values"
    )
    parser.add_argument(
        "--vocab", type=positive_int, nargs="+", default=[32768, 151936], help="V values"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"]
    )
    parser.add_argument(
        "--conditions",
        nargs="+",
        default=["idle", "busy"],
        choices=["idle", "busy"],
        help="CPU only (a GPU run has one condition)",
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed calls per method")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="subset of fused materialised trl naive gemm"
    )
    parser.add_argument("--quick", action="store_true", help="N 2048, H 1024, V 32768 only")
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--trainer", action="store_true", help="ERCTrainer step memory instead")
    args = parser.parse_args(argv)
    if args.trainer:
        for v in args.vocab:
            trainer_memory(v)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA device here")
    if args.quick:
        args.tokens, args.hidden, args.vocab = [2048], [1024], [32768]
    names = [k for k in methods(args.device) if args.methods is None or k in args.methods]
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at start"
    )
    if args.device == "cuda":
        args.conditions = ["gpu"]
    print(
        f"torch {torch.__version__}, {where}, dtype {args.dtype}; "
        + ("TRL found" if "trl" in names else "TRL not importable: its column is skipped")
    )
    mib = 1024 * 1024
    for n in args.tokens:
        for h in args.hidden:
            for v in args.vocab:
                logits_mib = n * v * 4 / mib
                for mode in args.modes:
                    head = f"N={n} H={h} V={v} {mode} (fp32 logits {logits_mib:.0f} MiB)"
                    if not args.no_memory:
                        measure = (
                            cuda_peak_extra_memory if args.device == "cuda" else peak_extra_memory
                        )
                        mem_names = [k for k in names if k != "gemm"]
                        mem = {k: measure(k, mode, n, h, v, args.dtype) for k in mem_names}
                        cells = "  ".join(f"{k} {mem[k] / mib:.0f}" for k in mem_names)
                        ratio = mem["materialised"] / max(mem["fused"], 1)
                        print(
                            f"{head} | peak extra MiB: {cells} | materialised / fused {ratio:.1f}x",
                            flush=True,
                        )
                    if args.no_time:
                        continue
                    for condition in args.conditions:
                        with busy_core(condition == "busy"):
                            t = time_all(
                                names, n, h, v, args.dtype, mode, args.repeats, args.device
                            )
                        digits = 2 if args.device == "cuda" else 0
                        cells = "  ".join(f"{k} {t[k] * 1e3:.{digits}f}" for k in names)
                        rel = ""
                        if "fused" in t and "materialised" in t:
                            rel = f"fused / materialised {t['fused'] / t['materialised']:.2f}x"
                        if "trl" in t and "fused" in t:
                            rel += f", fused / trl {t['fused'] / t['trl']:.2f}x"
                        if "fused_torch" in t:
                            rel += f", fused / fused_torch {t['fused'] / t['fused_torch']:.2f}x"
                        if mode == "fwd+bwd" and "gemm" in t and "materialised" in t:
                            floor = (t["materialised"] + t["gemm"]) / t["materialised"]
                            rel += f", recompute floor {floor:.2f}x"
                        print(f"{head} {condition:>4} | ms: {cells} | {rel}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        a = sys.argv[2:]
        _memory_child(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_trainer":
        _trainer_child(int(sys.argv[2]), bool(int(sys.argv[3])))
    else:
        main()
