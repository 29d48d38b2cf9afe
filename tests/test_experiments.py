"""Smoke tests of the experiment scripts with budgets of a few hundred steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for folder in ("experiments/bench", "experiments/studies", "experiments/gpu", "tools"):
    sys.path.insert(0, str(ROOT / folder))

import sb3_classic  # noqa: E402
import vocab_drift  # noqa: E402


def test_vocab_drift_measures_unsampled_drift():
    kw = {"seed": 0, "iterations": 2, "group": 8, "minibatches": 8, "lr": 0.2, "contexts": 4}
    ppo = vocab_drift.run(256, None, **kw)
    erc = vocab_drift.run(256, (0.95, 1.05), **kw)
    assert ppo["tv_unsampled"] > 0 and ppo["abs_dH"] > 0
    assert ppo["erc_clip_fraction"] == 0 < erc["erc_clip_fraction"]
    assert 0 < ppo["ratio_min"] <= 1 <= ppo["ratio_max"]


def test_sb3_classic_runs_and_summarizes(tmp_path):
    args = "--variants erc-0.95 --seeds 1 --steps 512 --eval-every 256 --eval-episodes 2"
    sb3_classic.main([*args.split(), "--workers", "1", "--root", str(tmp_path)])
    folder = tmp_path / "sb3_classic" / "CartPole-v1-ppo-erc0.95-1.05" / "0"
    assert (folder / "done").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["erc"] == [0.95, 1.05] and config["kind"] == "sb3"
    table = (tmp_path / "sb3_classic" / "summary_CartPole-v1.md").read_text()
    assert "| CartPole-v1-ppo-erc0.95-1.05 | 1 |" in table


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--random-share", "2"], "--random-share must be in (0, 1), got 2.0"),
        (["--only", "nope"], "unknown variants ['nope']"),
        (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
        (["--steps-per-rollout", "3"], "--steps-per-rollout: axes.steps_per_rollout=3 must"),
    ],
)
def test_llm_erc_drop_rejects_bad_arguments(args, needle, capsys, tmp_path):
    import llm_erc_drop

    with pytest.raises(SystemExit) as exc:
        llm_erc_drop.main([*args, "--root", str(tmp_path)])
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_llm_erc_drop_names_the_point():
    """Variants at another point carry its steps, and the summary picks the runs of one point."""
    import llm_erc_drop

    assert llm_erc_drop._suffix(4) == "" and llm_erc_drop._suffix(8) == "-s8"
    assert llm_erc_drop._point_of("add1-dapo-randmask0.26-s8") == 8
    assert llm_erc_drop._point_of("add1-dapo-lr1e-4-erc0.95-1.05") == 4
    assert llm_erc_drop._point_of("add1-dapo-randmask0.11") == 4
    assert llm_erc_drop._label() == "add2"  # stress_llm's env: its runs are the baselines
    _, settings = llm_erc_drop._base(8)
    assert settings["mini_batch_prompts"] == 2 and settings["lr"] == 3e-4


def test_bench_fused_head_prints_the_recompute_floor(capsys, monkeypatch):
    """The ``gemm`` method times one logits GEMM (no grad) and gives the recompute floor."""
    import re

    import bench_fused_head

    times = bench_fused_head.time_all(
        ["fused", "materialised", "gemm"], 64, 16, 256, "float32", "fwd+bwd", repeats=2
    )
    assert set(times) == {"fused", "materialised", "gemm"}
    # the GEMM alone (forward, no grad) is less work than logits + stats + backward
    assert 0 < times["gemm"] < times["materialised"]
    argv = "--tokens 64 --hidden 16 --vocab 256 --modes fwd+bwd --conditions idle --repeats 1"
    argv += " --no-memory --methods fused materialised gemm"
    monkeypatch.setattr(sys, "argv", ["bench_fused_head.py", *argv.split()])
    bench_fused_head.main()
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("N=64")]
    assert float(re.search(r"recompute floor ([\d.]+)x", line).group(1)) >= 1.0


def test_erc_epoch_drift_branches_start_from_the_same_policy():
    """With a band so wide that ERC never masks, the no-ERC and ERC branches of every rollout
    start from the same restored policy and optimiser state, so they end the same."""
    import erc_epoch_drift

    wide = erc_epoch_drift.drift("gppo", 3e-3, (0.01, 100.0), steps=4, rollouts=2, seed=0)
    assert len(wide) == 2
    for r in wide:
        assert r["masked"] == 0.0
        assert r["ratio_off"] == pytest.approx(r["ratio_erc"], rel=1e-4)
    # the paper's band does mask, and then the branches differ
    narrow = erc_epoch_drift.drift("gppo", 3e-3, (0.95, 1.05), steps=8, rollouts=1, seed=0)
    assert narrow[0]["masked"] > 0.01
    assert abs(narrow[0]["ratio_off"] - narrow[0]["ratio_erc"]) > 1e-3
    # the per-step shares the figure draws: 0 before the first step, shared after it, the last
    # one the record's own "after the last step" value
    for r in narrow:
        for key, last in (("steps_off", "out_off"), ("steps_erc", "out_erc")):
            assert len(r[key]) == 9 and r[key][0] == 0.0 and r[key][1] == r["out_first"]
            assert r[key][-1] == r[last]
        # states leave the band on both sides; the two sides make up the share outside
        assert r["below_first"] + r["above_first"] == pytest.approx(r["out_first"])


def test_rollout_drift_figure_from_the_bandit(tmp_path):
    from erc_gym.bandit import BanditConfig, rollout_drift
    from erc_gym.lab.plots import plot_rollout_drift

    d = rollout_drift(BanditConfig(vocab_size=256, minibatches=8, lr=0.2), warmup=2)
    assert d.outside["off"][0] == d.outside["erc"][0] == 0.0
    curves = [(f"V256, {name}", d.outside[name].tolist(), name == "erc") for name in d.outside]
    paths = plot_rollout_drift(curves, d.band, "VocabBandit", tmp_path / "drift")
    assert [p.suffix for p in paths] == [".png", ".svg"] and paths[0].stat().st_size > 5_000


#: One bad value per experiment script: each was a traceback, an argparse usage block, or a
#: run that started anyway (``--seeds 0`` printed an empty table; ``--repeats 0`` divided by 0).
SCRIPT_BAD_ARGS = [
    ("bench_entropy", ["--tokens", "-1"], "--tokens: must be >= 1, got -1"),
    ("bench_fused_head", ["--repeats", "0"], "--repeats: must be >= 1, got 0"),
    ("bench_llm_step", ["--vocab", "0"], "--vocab: must be >= 1, got 0"),
    ("bench_loss", ["--repeats", "0"], "--repeats: must be >= 1, got 0"),
    ("bench_sb3_speed", ["--steps", "0"], "--steps: must be >= 1, got 0"),
    ("bench_trl", ["--warmup", "-1"], "--warmup: must be >= 0, got -1"),
    ("erc_epoch_drift", ["--band", "1.05", "0.95"], "--band must satisfy low < 1 < high"),
    ("erc_epoch_drift", ["--lrs", "0"], "--lrs: must be a finite number > 0, got 0"),
    ("gpu_check", ["--quick", "x"], "unrecognized arguments: x"),
    ("gpu_llm_map", ["out", "--workers", "0"], "--workers: must be >= 1, got 0"),
    ("gpu_llm_map_summary", [], "the following arguments are required: runs"),
    ("gpu_trl_sharded", ["--tol", "0"], "--tol: must be a finite number > 0, got 0"),
    ("llm_erc_drop", ["--workers", "0"], "--workers: must be >= 1, got 0"),
    ("sb3_classic", ["--seeds", "0"], "--seeds: must be >= 1, got 0"),
    ("sb3_own_tests", ["--modes", "nope"], "invalid choice: 'nope'"),
    ("token_lm_sb3", ["--steps", "-5"], "--steps: must be >= 1, got -5"),
    ("trl_own_tests", ["--max-steps", "-1"], "--max-steps: must be >= 0, got -1"),
    ("vocab_drift", ["--seeds", "0"], "--seeds: must be >= 1, got 0"),
    ("vocab_drift", ["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    ("vocab_drift", ["--vocab", "1"], "vocab_size must be in [2, 151936], got vocab_size=1"),
]


@pytest.mark.parametrize(
    ("script", "args", "needle"),
    SCRIPT_BAD_ARGS,
    ids=[f"{s} {' '.join(a)}" for s, a, _ in SCRIPT_BAD_ARGS],
)
def test_experiment_scripts_reject_bad_values_in_one_line(script, args, needle, capsys):
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exc:
        module.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and needle in err[0], err
