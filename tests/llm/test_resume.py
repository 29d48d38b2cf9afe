"""LLM run folders: recorded settings, periodic checkpoints, kill and resume,
held-out splits of dataset files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_trainer import odd_length, small_config

from erc_gym.cli import main
from erc_gym.jsonl import read_jsonl
from erc_gym.llm import ERCTrainer, TrainerConfig


class Killed(Exception):
    """Stands in for a kill between two steps."""


def _raw_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_periodic_checkpoint_survives_a_crash_and_a_torn_line(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, steps=4, save_every=2)
    trainer = ERCTrainer(cfg, verifier=odd_length)
    real_step = trainer.train_step

    def crash_after_step_3():
        if trainer.step == 3:
            raise Killed
        return real_step()

    monkeypatch.setattr(trainer, "train_step", crash_after_step_3)
    with pytest.raises(Killed):
        trainer.train()
    run = tmp_path / "llm"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2  # periodic
    metrics = run / "metrics.jsonl"
    before = _raw_lines(metrics)
    assert [json.loads(x)["step"] for x in before] == [0, 1, 2, 3]
    with open(metrics, "a") as f:
        f.write('{"step": 4, "reward": 0.')  # killed mid-write
    resumed = ERCTrainer(cfg, verifier=odd_length)
    resumed.train()
    after = _raw_lines(metrics)
    assert [json.loads(x)["step"] for x in after] == [0, 1, 2, 3, 4]
    assert after[:3] == before[:3]  # lines up to the checkpoint are kept, byte for byte
    # (that the recomputed steps equal an uninterrupted run's: test_resume_gives_the_same_metrics)


def test_changed_settings_are_refused_and_restart_starts_over(tmp_path):
    ERCTrainer(small_config(tmp_path, steps=1), verifier=odd_length).train()
    changed = small_config(tmp_path, steps=2, lr=5e-3, loss="ppo", erc_low=0.9)
    with pytest.raises(ValueError, match=r"erc_low 0\.95 -> 0\.9, loss 'dapo' -> 'ppo', lr 0\.001"):
        ERCTrainer(changed, verifier=odd_length).train()
    saved = json.loads((tmp_path / "llm" / "config.json").read_text())
    assert saved["lr"] == 1e-3  # the refused run did not touch the folder
    # steps and logging may change on resume: a longer run continues
    more = ERCTrainer(small_config(tmp_path, steps=2, progress=True), verifier=odd_length)
    assert [ln["step"] for ln in more.train()] == [2]
    fresh = ERCTrainer(changed, verifier=odd_length)
    assert [ln["step"] for ln in fresh.train(resume=False)] == [0, 1, 2]
    assert json.loads((tmp_path / "llm" / "config.json").read_text())["loss"] == "ppo"
    assert [ln["step"] for ln in read_jsonl(tmp_path / "llm" / "metrics.jsonl")] == [0, 1, 2]


def _llm_argv(run_dir: Path, *extra: str) -> list[str]:
    return [
        "llm",
        "--sft-steps",
        "0",
        "--group-size",
        "4",
        "--prompts-per-step",
        "4",
        "--mini-batch-prompts",
        "2",
        "--max-new-tokens",
        "3",
        "--num-train",
        "64",
        "--num-eval",
        "4",
        "--filter-groups",
        "false",
        "--progress",
        "false",
        "--device",
        "cpu",
        "--run-dir",
        str(run_dir),
        "--name",
        "r",
        *extra,
    ]


def test_cli_refuses_a_changed_run_and_restart_overrides(tmp_path, capsys):
    main(_llm_argv(tmp_path, "--steps", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(_llm_argv(tmp_path, "--steps", "1", "--lr", "0.01"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert "lr 0.0001 -> 0.01" in err[0] and "--restart" in err[0]
    main(_llm_argv(tmp_path, "--steps", "1", "--lr", "0.01", "--restart"))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 0.01


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_resumes(tmp_path):
    """A real process killed with SIGKILL after a periodic checkpoint; metrics stay continuous."""
    argv = [sys.executable, "-m", "erc_gym", *_llm_argv(tmp_path, "--steps", "12")]
    argv += ["--save-every", "2", "--eval-every", "4"]
    run = tmp_path / "r"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        rows = read_jsonl(run / "metrics.jsonl")
        if (run / "checkpoint.pt").exists() and len(rows) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    before = _raw_lines(run / "metrics.jsonl")
    assert 2 <= ckpt < 12
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "rew')  # as if killed mid-write
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _raw_lines(run / "metrics.jsonl")
    assert [json.loads(x)["step"] for x in after] == list(range(13))
    assert after[: ckpt + 1] == before[: ckpt + 1]  # nothing the checkpoint covers was rewritten
    assert json.loads(done.stdout.splitlines()[-1])["steps"] == 12


def test_dataset_file_without_eval_dataset_holds_out_disjoint_prompts(tmp_path):
    from erc_gym.llm.trainer import split_held_out

    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(40)]
    rows += rows[:10]  # duplicated prompts must not leak into the held-out set
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = small_config(tmp_path, dataset=str(data), num_eval=8)
    trainer = ERCTrainer(cfg, verifier=odd_length)
    held = [p["prompt"] for p in trainer.eval_problems]
    train = {p["prompt"] for p in trainer.train_problems}
    assert len(held) == len(set(held)) == 8
    assert not set(held) & train
    assert len(train) == 32
    again = ERCTrainer(cfg, verifier=odd_length)
    assert [p["prompt"] for p in again.eval_problems] == held  # deterministic
    assert split_held_out(rows, 100, seed=1)[1] != split_held_out(rows, 100, seed=2)[1]
    assert len(split_held_out(rows, 100, seed=1)[1]) == 10  # at most a quarter
    with pytest.raises(ValueError, match=r"3 distinct prompts.*--eval-dataset"):
        split_held_out(rows[:3], 8, seed=0)


def test_trainer_config_default_checkpoints_periodically():
    cfg = TrainerConfig()
    assert cfg.save_every > 0 and cfg.save_minutes > 0
