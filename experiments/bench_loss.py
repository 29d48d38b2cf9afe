"""Benchmark: the cost of ERC inside erc_gym.losses.policy_loss (forward + backward).

Times the same clip configuration with and without the ERC mask at (B, T) = (64, 1024),
alternating the two so machine noise hits both, and prints the median time and the ratio.

Usage::

    python experiments/bench_loss.py
    python experiments/bench_loss.py --batch 8 --tokens 256 --repeats 50 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from erc_gym.losses import ERCConfig, LossConfig, policy_loss


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(batch: int, tokens: int, repeats: int, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (batch, tokens)
    old = (-torch.rand(shape, generator=g) * 3).to(device)
    base_lp = (old + 0.1 * torch.randn(shape, generator=g).to(old)).to(device)
    adv = torch.randn(batch, 1, generator=g).to(device)
    h_old = torch.rand(shape, generator=g).to(device)
    h = (h_old * (1 + 0.05 * torch.randn(shape, generator=g).to(h_old))).abs()
    mask = (torch.rand(shape, generator=g) > 0.1).to(device)
    print(f"torch {torch.__version__}, device {device}, (B, T) = {shape}, repeats {repeats}")
    print(f"{'config':<10} {'ERC off ms':>11} {'ERC on ms':>10} {'ratio':>7}")
    for name, make in (
        ("ppo", LossConfig.ppo),
        ("dapo", LossConfig.dapo),
        ("gppo", LossConfig.gppo),
    ):
        configs = {"off": make(), "on": make(erc=ERCConfig(0.95, 1.05))}
        times: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(repeats + 3):
            for key, cfg in configs.items():
                lp = base_lp.clone().requires_grad_(True)
                _sync(device)
                t0 = time.perf_counter()
                out = policy_loss(lp, old, adv, entropy=h, old_entropy=h_old, mask=mask, config=cfg)
                out.loss.backward()
                _sync(device)
                if i >= 3:  # warm-up
                    times[key].append(time.perf_counter() - t0)
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        print(f"{name:<10} {off * 1e3:>11.3f} {on * 1e3:>10.3f} {on / off:>6.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="sequences B")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sequence T")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per config")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    bench(args.batch, args.tokens, args.repeats, args.device)


if __name__ == "__main__":
    main()
