"""Benchmark: the cost of ERC inside erc_gym.losses.policy_loss (forward + backward).

Times the same clip configuration with and without the ERC mask at (B, T) = (64, 1024),
alternating the two so machine noise hits both, and prints the median time and the ratio.
``--against REF`` also times ``erc_gym/losses.py`` as it is at the git revision REF, interleaved
with this tree's in the same process, to give a before/after of a change on a noisy machine.

Usage::

    python experiments/bench/bench_loss.py
    python experiments/bench/bench_loss.py --against main --threads 1
    python experiments/bench/bench_loss.py --batch 8 --tokens 256 --repeats 50 --device cuda
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

import erc_gym.losses
from erc_gym.cli_args import CliParser, positive_int


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_losses_at(ref: str) -> ModuleType:
    """``erc_gym/losses.py`` as it is at git revision ``ref``, as a module of its own."""
    root = Path(__file__).resolve().parents[2]
    source = subprocess.run(
        ["git", "show", f"{ref}:erc_gym/losses.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = f"_losses_at_{ref.replace('/', '_').replace('-', '_')}"
    module = ModuleType(name)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    exec(compile(source, f"{ref}:erc_gym/losses.py", "exec"), module.__dict__)
    return module


def bench(batch: int, tokens: int, repeats: int, device: str, against: str | None = None) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (batch, tokens)
    old = (-torch.rand(shape, generator=g) * 3).to(device)
    base_lp = (old + 0.1 * torch.randn(shape, generator=g).to(old)).to(device)
    adv = torch.randn(batch, 1, generator=g).to(device)
    h_old = torch.rand(shape, generator=g).to(device)
    h = (h_old * (1 + 0.05 * torch.randn(shape, generator=g).to(h_old))).abs()
    mask = (torch.rand(shape, generator=g) > 0.1).to(device)
    modules = {"this tree": erc_gym.losses}
    if against is not None:
        modules[against] = load_losses_at(against)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"(B, T) = {shape}, repeats {repeats}"
    )
    print(f"{'config':<10} {'losses.py':<12} {'ERC off ms':>11} {'ERC on ms':>10} {'ratio':>7}")
    for name in ("ppo", "dapo", "gppo"):
        configs = {}
        for label, mod in modules.items():
            make = getattr(mod.LossConfig, name)
            configs[(label, "off")] = (mod, make())
            configs[(label, "on")] = (mod, make(erc=mod.ERCConfig(0.95, 1.05)))
        times: dict[tuple[str, str], list[float]] = {key: [] for key in configs}
        for i in range(repeats + 3):
            for key, (mod, cfg) in configs.items():
                lp = base_lp.clone().requires_grad_(True)
                _sync(device)
                t0 = time.perf_counter()
                out = mod.policy_loss(
                    lp, old, adv, entropy=h, old_entropy=h_old, mask=mask, config=cfg
                )
                out.loss.backward()
                _sync(device)
                if i >= 3:  # warm-up
                    times[key].append(time.perf_counter() - t0)
        medians = {key: statistics.median(t) for key, t in times.items()}
        for label in modules:
            off, on = medians[(label, "off")], medians[(label, "on")]
            print(f"{name:<10} {label:<12} {off * 1e3:>11.3f} {on * 1e3:>10.3f} {on / off:>6.3f}x")
        if against is not None:
            ratios = [medians[("this tree", k)] / medians[(against, k)] for k in ("off", "on")]
            print(f"{'':<10} this tree / {against}: ERC off {ratios[0]:.3f}x, on {ratios[1]:.3f}x")


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=positive_int, default=64, help="sequences B")
    parser.add_argument("--tokens", type=positive_int, default=1024, help="tokens per sequence T")
    parser.add_argument("--repeats", type=positive_int, default=200, help="timed calls per config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--against", default=None, help="git revision whose erc_gym/losses.py to time as well"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bench(args.batch, args.tokens, args.repeats, args.device, args.against)


if __name__ == "__main__":
    main()
