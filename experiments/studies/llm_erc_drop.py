"""Why does ERC lower the tiny LM's held-out accuracy? Controlled runs.

The findings are in docs/when_to_use_erc.md.

Every variant is DAPO on ``stress_llm``'s task at its base point (the shipped config: 2-digit
addition, tiny model, 450-step SFT warm start, 16 prompts x 8 samples, 4 optimiser steps per
rollout, AdamW lr 3e-4, 200 RL steps), so the ERC-off and ERC(0.95, 1.05) baselines are the
``stress_llm`` cells ``s4-lr0.0003``. The findings in the docs were measured on the config's earlier
1-digit version (docs/when_to_use_erc.md says how to restore it). One hypothesis per variant:

* ``tokens`` -- ERC(0.95, 1.05) with a recorder: which tokens ERC clips (response position, digit or
  end-of-sequence, sign of the advantage, first or later mini-batch step), written to
  ``runs/llm_erc_drop/tokens.json``;
* ``erc0.8-1.2`` -- the band width (the reference code's default band);
* ``randmask`` -- the gradient lost: the gradient of a *random* share ``p`` of the tokens is
  stopped through the same loss (``old_entropy`` is set so that ``rho`` = 1 or 0.5), with ``p`` =
  ERC(0.95, 1.05)'s measured clip fraction; if accuracy drops as much as with ERC, the amount of
  gradient lost explains it, if not, the choice of tokens does;
* ``lr1e-4`` -- the update size: ERC off and ERC(0.95, 1.05) at a third of the learning rate.

Run: ``python experiments/studies/llm_erc_drop.py [--workers 2] [--only NAME ...]``; then
``erc-gym report runs/llm_erc_drop`` for the table. Runs are skipped when done.
``--steps-per-rollout S`` moves every variant to ``stress_llm``'s point ``S`` x lr 3e-4 (variant
names get ``-sS``; the baselines are then the ``stress_llm`` cells ``sS-lr0.0003``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from erc_gym.cli_args import CliParser, positive_int
from erc_gym.lab.config import load_experiment
from erc_gym.lab.grid import RunSpec
from erc_gym.lab.runner import run_one

EXPERIMENT = "llm_erc_drop"
BAND = (0.95, 1.05)
LR = 3e-4
DEFAULT_STEPS = 4


def _base(steps: int = DEFAULT_STEPS) -> tuple[dict[str, Any], dict[str, Any]]:
    """Env and settings of ``stress_llm``'s point (``steps`` optimiser steps per rollout, lr 3e-4).

    :raises ValueError: ``steps`` does not divide the prompts per step (or is not a multiple).
    """
    spec = load_experiment("stress_llm")
    env = {k: v for k, v in spec["envs"][0].items() if k != "label"}
    from erc_gym.lab.kinds import axis_settings

    settings = axis_settings("llm", env, spec["settings"], {"steps_per_rollout": steps, "lr": LR})
    return env, settings


def _label() -> str:
    """``stress_llm``'s env label (its variant names start with it)."""
    return str(load_experiment("stress_llm")["envs"][0]["label"])


def _suffix(steps: int) -> str:
    """Variant-name suffix of a point other than the default one."""
    return "" if steps == DEFAULT_STEPS else f"-s{steps}"


def _point_of(variant: str) -> int:
    """The steps per rollout a variant of this script ran at (its ``-sS`` suffix, else 4)."""
    match = re.search(r"-s(\d+)$", variant)
    return int(match.group(1)) if match else DEFAULT_STEPS


def variants(random_share: float) -> dict[str, tuple[tuple[float, float] | None, dict, list[int]]]:
    """name -> (ERC band, setting overrides, seeds)."""
    return {
        "tokens": (BAND, {}, [0]),
        "erc0.8-1.2": ((0.8, 1.2), {}, [0, 1, 2]),
        f"randmask{random_share:g}": (BAND, {}, [0, 1, 2]),
        "lr1e-4-off": (None, {"lr": 1e-4}, [0, 1, 2]),
        "lr1e-4-erc0.95-1.05": (BAND, {"lr": 1e-4}, [0, 1, 2]),
    }


class _TokenRecorder:
    """Counts ERC-clipped and kept tokens by position, token class, advantage sign, step index."""

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.response_ids: torch.Tensor | None = None
        self.calls = 0
        self.counts: dict[str, dict[str, list[float]]] = {}

    def add(self, table: str, key: str, clipped: torch.Tensor, h_old: torch.Tensor) -> None:
        row = self.counts.setdefault(table, {}).setdefault(key, [0.0, 0.0, 0.0, 0.0])
        row[0] += float((~clipped).sum())
        row[1] += float(clipped.sum())
        row[2] += float(h_old[~clipped].sum())
        row[3] += float(h_old[clipped].sum())

    def record(self, stats: Any, steps_per_rollout: int) -> None:
        valid = stats.valid
        rho = stats.rho
        if rho is None or valid is None or self.response_ids is None:
            return
        low, high = stats.config.erc.low, stats.config.erc.high
        clipped = ~((low < rho) & (rho < high)) & valid
        ids = self.response_ids.to(rho.device)
        eos = self.tokenizer.eos_token_id
        first = self.calls % steps_per_rollout == 0
        self.calls += 1
        for t in range(rho.shape[1]):
            v = valid[:, t]
            self.add("position", str(t), clipped[:, t][v], stats.old_entropy[:, t][v])
        is_eos = (ids == eos) & valid
        self.add("token", "end-of-sequence", clipped[is_eos], stats.old_entropy[is_eos])
        self.add("token", "digit", clipped[valid & ~is_eos], stats.old_entropy[valid & ~is_eos])
        for name, sel in (("A > 0", stats.advantages > 0), ("A < 0", stats.advantages < 0)):
            m = sel & valid
            self.add("advantage", name, clipped[m], stats.old_entropy[m])
        key = "first (on-policy)" if first else "later (off-policy)"
        self.add("minibatch", key, clipped[valid], stats.old_entropy[valid])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for table, rows in self.counts.items():
            out[table] = {
                k: {
                    "tokens": kept + clip,
                    "clip_fraction": clip / max(kept + clip, 1),
                    "h_old_kept": hk / max(kept, 1),
                    "h_old_clipped": hc / max(clip, 1) if clip else None,
                }
                for k, (kept, clip, hk, hc) in rows.items()
            }
        return out


def _patched(
    kind: str, random_share: float, recorder: _TokenRecorder | None, steps: int
) -> Callable:
    """Patch the LLM trainer's loss (and model loading) for one variant; returns an undo."""
    import erc_gym.llm.trainer as trainer

    original_loss = trainer.policy_loss
    original_lp = trainer.response_logprobs
    original_load = trainer.ERCTrainer._load_model
    gen = torch.Generator().manual_seed(1234)

    def loss(*args: Any, **kwargs: Any) -> Any:
        if kind == "randmask":
            h = kwargs["entropy"].detach()
            stop = torch.rand(h.shape, generator=gen).to(h.device) < random_share
            kwargs["old_entropy"] = torch.where(stop, 2.0 * h + 1e-3, h)
        out = original_loss(*args, **kwargs)
        if recorder is not None:
            recorder.record(out.stats, steps)
        return out

    def logprobs(model: Any, batch: Any, **kwargs: Any) -> Any:
        if recorder is not None:
            recorder.response_ids = batch.response_ids
        return original_lp(model, batch, **kwargs)

    def load(self: Any) -> Any:
        model, tokenizer = original_load(self)
        if recorder is not None:
            recorder.tokenizer = tokenizer
        return model, tokenizer

    trainer.policy_loss = loss
    trainer.response_logprobs = logprobs
    setattr(trainer.ERCTrainer, "_load_model", load)  # noqa: B010 (a method, patched)

    def undo() -> None:
        trainer.policy_loss = original_loss
        trainer.response_logprobs = original_lp
        setattr(trainer.ERCTrainer, "_load_model", original_load)  # noqa: B010

    return undo


def run_variant(
    name: str, seed: int, random_share: float, root: str, steps: int = DEFAULT_STEPS
) -> str:
    torch.set_num_threads(1)
    env, settings = _base(steps)
    label = _label()
    band, overrides, _ = variants(random_share)[name]
    run = RunSpec(
        experiment=EXPERIMENT,
        variant=f"{label}-dapo-{name}{_suffix(steps)}",
        seed=seed,
        kind="llm",
        algorithm="dapo",
        erc=band,
        env=env,
        settings={**settings, **overrides},
        env_label=label,
    )
    if (run.folder(root) / "done").exists():
        return f"{run.variant}/{seed}: done before"
    kind = "randmask" if name.startswith("randmask") else name
    recorder = _TokenRecorder() if name == "tokens" else None
    undo = _patched(kind, random_share, recorder, steps)
    try:
        run_one(run, root, resume=False)
    finally:
        undo()
    if recorder is not None:
        out = Path(root) / EXPERIMENT / f"tokens{_suffix(steps)}.json"
        out.write_text(json.dumps(recorder.summary(), indent=2))
    return f"{run.variant}/{seed}: finished"


def summary(root: str, steps: int = DEFAULT_STEPS) -> str:
    """Markdown table: the variants at ``steps`` x lr 3e-4 and ``stress_llm``'s cells there."""
    from erc_gym.lab.analysis import load_runs, summarize
    from erc_gym.lab.stats import diff_ci, probability_of_improvement

    runs = [
        r
        for r in load_runs(Path(root) / "stress_llm")
        if (r.config.get("axes") or {}) == {"steps_per_rollout": steps, "lr": LR} and r.done
    ]
    here = Path(root) / EXPERIMENT
    if here.is_dir():
        runs += [r for r in load_runs(here) if r.done and _point_of(r.variant) == steps]
    rows = summarize(runs)
    base = next((r for r in rows if r["variant"] == f"{_label()}-dapo-s{steps}-lr{LR:g}"), None)
    lines = [
        "| variant | n | final acc. per seed | IQM | Δ IQM vs DAPO [95% CI] | PoI vs DAPO "
        "| mean acc. over training | ERC clip | grad norm | final entropy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = poi = "–"
        if base is not None and r is not base:
            dd = diff_ci(r["per_seed"], base["per_seed"])
            pp = probability_of_improvement(r["per_seed"], base["per_seed"])
            d = f"{dd[0]:+.3f} [{dd[1]:+.3f}, {dd[2]:+.3f}]"
            poi = f"{pp[0]:.2f} [{pp[1]:.2f}, {pp[2]:.2f}]"
        grad = sum(_mean_series(x, "grad_norm") for x in runs if x.variant == r["variant"])
        n = len(r["per_seed"])
        lines.append(
            f"| {r['variant']} | {n} | {', '.join(f'{v:.2f}' for v in r['per_seed'])} "
            f"| {r['iqm']:.3f} | {d} | {poi} | {r['score_mean']:.3f} "
            f"| {r['erc_clip_fraction']:.3f} | {grad / n:.2f} | {r['entropy_final']:.2f} |"
        )
    return "\n".join(lines)


def _mean_series(run: Any, name: str) -> float:
    ys = run.series(name)[1]
    return float(ys.mean()) if ys.size else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs")
    parser.add_argument("--workers", type=positive_int, default=1)
    parser.add_argument(
        "--random-share",
        type=float,
        default=0.11,
        help="share of tokens whose gradient randmask stops (ERC(0.95, 1.05)'s clip "
        "fraction at this point: 0.109)",
    )
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--summary", action="store_true", help="print the table and exit")
    parser.add_argument(
        "--seeds", type=positive_int, default=3, help="run at most the first N seeds"
    )
    parser.add_argument(
        "--steps-per-rollout",
        type=positive_int,
        default=DEFAULT_STEPS,
        help="optimiser steps per rollout of the point (lr stays 3e-4; default 4)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.random_share < 1:
        print(f"--random-share must be in (0, 1), got {args.random_share}", file=sys.stderr)
        raise SystemExit(2)
    try:
        _base(args.steps_per_rollout)
    except ValueError as err:
        print(f"--steps-per-rollout: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.summary:
        print(summary(args.root, args.steps_per_rollout))
        return
    table = variants(args.random_share)
    names = args.only or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown variants {unknown}; choose from {list(table)}", file=sys.stderr)
        raise SystemExit(2)
    jobs = [(n, s) for n in names for s in table[n][2][: args.seeds]]
    (Path(args.root) / EXPERIMENT).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [
            pool.submit(run_variant, n, s, args.random_share, args.root, args.steps_per_rollout)
            for n, s in jobs
        ]
        for fut in futures:
            print(fut.result(), flush=True)


if __name__ == "__main__":
    main()
