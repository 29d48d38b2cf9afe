"""The ~0.1B GPU LLM map: preset, shipped config, and the script's shrunk CPU path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import erc_gym.lab.runner as runner_module
from erc_gym.cli import report_main
from erc_gym.lab.config import load_experiment
from erc_gym.lab.grid import expand
from erc_gym.lab.rundir import resolved_config
from erc_gym.llm.model import TINY_PRESETS, make_tiny_lm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu" / "gpu_llm_map.sh"
sys.path.insert(0, str(ROOT / "experiments" / "gpu"))

import gpu_llm_map  # noqa: E402


def test_base100m_preset_has_about_100m_parameters():
    import torch

    with torch.device("meta"):  # shapes only: counting needs no initialised weights
        model = make_tiny_lm(18, "base100m")
    n = sum(p.numel() for p in model.parameters())
    print(f"base100m: {n:,} parameters")
    assert 90e6 < n < 110e6
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == 768
    assert "base100m" in TINY_PRESETS


def test_stress_llm_gpu_config_is_the_gpu_grid():
    runs = expand(load_experiment("stress_llm_gpu"))
    assert len(runs) == 12
    trainers = [resolved_config(r)["trainer"] for r in runs]  # TrainerConfig validates each
    assert {(t["device"], t["dtype"], t["model"], t["digits"]) for t in trainers} == {
        ("cuda", "float32", "base100m", 2)
    }
    # steps per rollout 1 / 4 / 16 of 16 prompts; no periodic checkpoints of ~1.2 GB each
    assert {t["prompts_per_step"] // t["mini_batch_prompts"] * t["epochs"] for t in trainers} == {
        1,
        4,
        16,
    }
    assert {t["lr"] for t in trainers} == {3e-5, 3e-4}
    assert {(t["erc_low"], t["erc_high"]) for t in trainers} == {(None, None), (0.95, 1.05)}
    assert all(t["save_every"] == 0 and t["save_minutes"] == 0 for t in trainers)


def test_runner_spawns_when_the_parent_has_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert runner_module._mp_context().get_start_method() == "fork"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert runner_module._mp_context().get_start_method() == "spawn"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget-s", "10"], "--budget-s must be > 30, got 10.0"),
        (["--workers", "0"], "--workers: must be >= 1, got 0"),
        (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
    ],
)
def test_script_rejects_bad_settings(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_llm_map.main([str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_script_seeds_override_doubles_the_grid():
    assert len(expand(gpu_llm_map.experiment_spec(False, seeds=2))) == 24
    assert len(expand(gpu_llm_map.experiment_spec(True, seeds=2))) == 8


def _run_script(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ERC_GYM_GPU_MAP_SHRINK": "1", "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "workers",
    [
        # one process: the whole path in one subprocess
        pytest.param("1", marks=pytest.mark.slow),
        # one process per run, as on the GPU (each imports torch: ~40 s on a busy 2-core box)
        pytest.param("4", marks=pytest.mark.slow),
    ],
)
def test_shrunk_script_end_to_end_then_report_of_the_unpacked_runs(tmp_path, workers):
    out, runs = tmp_path / "out", tmp_path / "runs"
    proc = _run_script(out, "--runs", str(runs), "--workers", workers)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_llm_map.tar.gz",
        "report.md",
        "status.json",
    ]
    status = json.loads((out / "status.json").read_text())
    assert status["shrunk"] and not status["timed_out"]
    assert status["runs_done"] == status["runs_total"] == 4
    # checkpoints were written beside the runs, and stay out of the tarball
    assert list(runs.rglob("checkpoint.pt"))
    with tarfile.open(out / "gpu_llm_map.tar.gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert not [n for n in names if n.endswith(".pt") or "/model/" in n]
    metrics = sorted(n for n in names if n.endswith("metrics.jsonl"))
    assert len(metrics) == 4 and all(n.startswith("stress_llm_gpu/add2-dapo") for n in metrics)
    experiment = tmp_path / "unpacked" / "stress_llm_gpu"
    lines = [
        json.loads(x) for x in (experiment / metrics[0].split("/", 1)[1]).read_text().splitlines()
    ]
    assert [x["step"] for x in lines] == [0, 1, 2] and "eval_accuracy" in lines[-1]
    for figure in (experiment / "figures").iterdir():
        figure.unlink()  # the report must redraw them from the unpacked metrics alone
    report_main([str(experiment)])
    text = (experiment / "report.md").read_text()
    assert "add2-dapo-erc0.95-1.05-s4-lr0.0003" in text
    assert (experiment / "figures" / "add2_stress_map.png").exists()


@pytest.mark.slow  # the shrunk GPU script end to end, in a subprocess
def test_shrunk_script_stopped_by_its_budget_still_packs(tmp_path):
    out = tmp_path / "out"
    # 31 s minus the 30 s reserve: the grid is stopped (SIGTERM) within its first second
    proc = _run_script(out, "--budget-s", "31", "--workers", "1")
    assert proc.returncode == 1, proc.stderr[-2000:]
    status = json.loads((out / "status.json").read_text())
    assert status["timed_out"] and status["runs_unfinished"]
    assert (out / "gpu_llm_map.tar.gz").exists()
    # the default scratch runs folder (checkpoints of ~1.6 GB per run on the GPU) is removed
    scratch = status["runs_dir"].removesuffix(" (deleted after packing)")
    assert scratch != status["runs_dir"] and not Path(scratch).exists()
