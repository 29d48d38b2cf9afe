"""How far does each optimiser step on one rollout move the per-state entropy, with and without ERC?

ERC masks the states whose entropy ratio ``H_new / H_old`` has left the band, but it can act only
from the second optimiser step on a rollout (the first is on-policy: every ratio is 1), and a
masked state keeps moving when the *other* states' gradients change the shared network. This
script measures both effects on CartPole-v1 (zoo preset, one full-batch optimiser step per epoch,
as the ``stress_classic`` map): it trains ERCPPO one step at a time and, after every step on a
rollout, records the share of the rollout's states whose entropy ratio is outside the band and
the ratio of the mean entropies.

Usage::

    python experiments/studies/erc_epoch_drift.py                  # GPPO, lr 1e-3 and 3e-3, 3 seeds
    python experiments/studies/erc_epoch_drift.py --lrs 3e-3 --rollouts 20 --seeds 1
    python experiments/studies/erc_epoch_drift.py --figure docs/figures/erc_epoch_drift

Prints one row per (lr, ERC on/off) with the share of states outside the band after the first
step (before ERC can act) and after the last, medians over rollouts and seeds.
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erc_gym.cli_args import CliParser, positive_float, positive_int
from erc_gym.sb3 import ERCPPO
from erc_gym.sb3.distributions import state_entropy
from erc_gym.sb3.presets import make_env_kwargs, ppo_kwargs

ENV_ID = "CartPole-v1"
#: Rollouts whose mean old entropy is below this (a collapsed policy) are left out of the medians.
MIN_ENTROPY = 0.05
ALGOS: dict[str, dict[str, Any]] = {
    "ppo": {},
    "gppo": {"clip_variant": "gppo", "dual_clip": 10.0},
}


def _entropies(model: ERCPPO) -> tuple[np.ndarray, np.ndarray]:
    """(current, old) per-state entropy over the rollout buffer's states."""
    buffer: Any = model.rollout_buffer
    obs = torch.as_tensor(buffer.observations, dtype=torch.float32).reshape(
        -1,
        *model.observation_space.shape,  # type: ignore[misc]
    )
    with torch.no_grad():
        current = state_entropy(model.policy.get_distribution(obs)).numpy()
    return current, np.asarray(buffer.old_entropy, dtype=np.float64).reshape(-1)


def _sides(model: ERCPPO, band: tuple[float, float]) -> tuple[float, float, float]:
    """(share below ``band``, share above it, mean-entropy ratio) over the rollout's states."""
    current, old = _entropies(model)
    ratio = current / np.maximum(old, 1e-12)
    below, above = float(np.mean(ratio < band[0])), float(np.mean(ratio > band[1]))
    return below, above, float(current.mean() / old.mean())


def _measure(model: ERCPPO, band: tuple[float, float]) -> tuple[float, float]:
    """(share of the rollout's states with entropy ratio outside ``band``, mean-entropy ratio)."""
    below, above, mean_ratio = _sides(model, band)
    return below + above, mean_ratio


def drift(
    algo: str,
    lr: float,
    band: tuple[float, float],
    steps: int,
    rollouts: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Train with ERC ``band`` for ``rollouts`` rollouts; on each, also branch off without ERC.

    On every rollout the first (on-policy) step is shared; from there the same policy and
    optimiser state take ``steps - 1`` more full-batch steps once without ERC (a branch that is
    then discarded) and once with ERC (the run continues from this one). One record per rollout:
    ``out_first`` (share of the rollout's states whose entropy ratio is outside ``band`` after the
    first step; ``below_first`` / ``above_first`` split it by side), ``out_off`` / ``out_erc``
    (after the last step without / with ERC), the same for the mean-entropy ratio
    (``ratio_first``, ``ratio_off``, ``ratio_erc``), ``masked`` (ERC's clip fraction over the
    off-policy steps), ``entropy_old`` (the rollout's mean old entropy) and ``steps_off`` /
    ``steps_erc`` (the share outside ``band`` before the first step, 0, and after each step,
    without / with ERC).
    """
    from stable_baselines3.common.env_util import make_vec_env

    env_kw = make_env_kwargs(ENV_ID)
    kwargs = ppo_kwargs(ENV_ID, seed=seed, device="cpu", verbose=0)
    kwargs.pop("policy", None)
    kwargs.update(learning_rate=lr, n_epochs=1, batch_size=kwargs["n_steps"] * env_kw["n_envs"])
    env = make_vec_env(ENV_ID, n_envs=env_kw["n_envs"], seed=seed)
    model = ERCPPO("MlpPolicy", env, **kwargs, **ALGOS[algo], erc_low=band[0], erc_high=band[1])
    per_rollout = int(kwargs["n_steps"]) * int(env_kw["n_envs"])
    records: list[dict[str, Any]] = []
    for _ in range(rollouts):
        # one rollout and its first (on-policy) step: learn() collects, then train()s once
        model.learn(per_rollout, reset_num_timesteps=False)
        below_first, above_first, ratio_first = _sides(model, band)
        out_first = below_first + above_first
        saved = copy.deepcopy((model.policy.state_dict(), model.policy.optimizer.state_dict()))
        erc_band = (model.erc_low, model.erc_high)  # ERCPPO.erc_enabled reads these
        model.erc_low = model.erc_high = None
        steps_off = [0.0, out_first]
        for _ in range(steps - 1):
            model.train()
            steps_off.append(_measure(model, band)[0])
        out_off, ratio_off = _measure(model, band)
        model.policy.load_state_dict(saved[0])
        model.policy.optimizer.load_state_dict(saved[1])
        model.erc_low, model.erc_high = erc_band
        masked = []
        steps_erc = [0.0, out_first]
        for _ in range(steps - 1):
            model.train()
            masked.append(model.logger.name_to_value.get("train/erc_clip_fraction", np.nan))
            steps_erc.append(_measure(model, band)[0])
        out_erc, ratio_erc = _measure(model, band)
        old_mean = float(model.rollout_buffer.old_entropy.mean())  # type: ignore[attr-defined]
        records.append(
            {
                "out_first": out_first,
                "below_first": below_first,
                "above_first": above_first,
                "out_off": out_off,
                "out_erc": out_erc,
                "ratio_first": ratio_first,
                "ratio_off": ratio_off,
                "ratio_erc": ratio_erc,
                "masked": float(np.nanmean(masked)) if masked else 0.0,
                "entropy_old": old_mean,
                "steps_off": steps_off,
                "steps_erc": steps_erc,
            }
        )
    return records


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algo", choices=sorted(ALGOS), default="gppo")
    parser.add_argument("--lrs", type=positive_float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument(
        "--steps", type=positive_int, default=16, help="optimiser steps per rollout"
    )
    parser.add_argument("--rollouts", type=positive_int, default=40, help="rollouts per run")
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--band", type=positive_float, nargs=2, default=[0.95, 1.05])
    parser.add_argument(
        "--figure",
        type=Path,
        help="also draw the median share outside the band after each step, with and without "
        "ERC, to FIGURE.png / .svg",
    )
    args = parser.parse_args(argv)
    if not args.band[0] < 1 < args.band[1]:
        parser.error(f"--band must satisfy low < 1 < high, got {args.band}")
    torch.set_num_threads(1)
    band = (args.band[0], args.band[1])
    print(
        f"{ENV_ID}, {args.algo.upper()} + ERC{band}, {args.steps} full-batch steps per rollout, "
        f"{args.rollouts} rollouts x {args.seeds} seeds (the run continues with ERC). On each "
        "rollout, after the shared first step, the same policy takes the other steps once "
        "without and once with ERC. 'out' = share of the rollout's states whose entropy ratio "
        f"is outside {band}; 'H ratio' = mean entropy after / before. Medians over the rollouts "
        f"whose mean old entropy is > {MIN_ENTROPY} nats (not yet collapsed)."
    )
    print(
        "lr       rollouts | out: step 1   last, no ERC   last, ERC | H ratio: step 1   "
        "last, no ERC   last, ERC | ERC-masked share"
    )
    curves: list[tuple[str, list[float], bool]] = []
    sides: list[str] = []
    for lr in args.lrs:
        recs = [
            r
            for seed in range(args.seeds)
            for r in drift(args.algo, lr, band, args.steps, args.rollouts, seed)
            if r["entropy_old"] > MIN_ENTROPY
        ]
        if not recs:
            print(f"{lr:<8g} 0 rollouts above {MIN_ENTROPY} nats")
            continue

        def med(key: str, recs: list[dict[str, Any]] = recs) -> float:
            return statistics.median(r[key] for r in recs)

        print(
            f"{lr:<8g} {len(recs):>8} | {med('out_first'):>11.1%} {med('out_off'):>14.1%} "
            f"{med('out_erc'):>11.1%} | {med('ratio_first'):>15.3f} {med('ratio_off'):>14.3f} "
            f"{med('ratio_erc'):>11.3f} | {med('masked'):>16.1%}",
            flush=True,
        )
        sides.append(
            f"lr {lr:g}: {med('below_first'):.1%} below the band, {med('above_first'):.1%} above"
        )
        for key, erc in (("steps_off", False), ("steps_erc", True)):
            per_step = np.median(np.array([r[key] for r in recs]), axis=0)
            label = f"lr {lr:g}, {'ERC' if erc else 'no ERC'}"
            curves.append((label, per_step.tolist(), erc))
    if sides:
        print("After step 1, by side (medians): " + "; ".join(sides))
    if args.figure is not None and curves:
        from erc_gym.lab.plots import plot_rollout_drift

        title = f"{ENV_ID} {args.algo.upper()}, {args.steps} full-batch steps per rollout"
        paths = plot_rollout_drift(curves, band, title, args.figure)
        print("figure:", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main(sys.argv[1:])
