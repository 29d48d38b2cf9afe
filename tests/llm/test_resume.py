"""LLM run folders: recorded settings, periodic checkpoints, kill and resume,
held-out splits of dataset files."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
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


def _stderr_lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return captured.err.strip().splitlines()


@pytest.fixture
def warm_starts(monkeypatch):
    """Counts the supervised warm starts (each is 300 steps with the presets' defaults)."""
    import erc_gym.llm.model as model_module

    calls = []
    real = model_module.sft_warmstart

    def counted(*args, **kwargs):
        calls.append(kwargs["steps"])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "sft_warmstart", counted)
    return calls


def test_rerun_of_a_finished_or_resumable_run_says_so_and_skips_the_warm_start(
    tmp_path, capsys, warm_starts
):
    """Re-running recomputed the warm start first and said nothing about resuming."""
    main(_llm_argv(tmp_path, "--steps", "1", "--sft-steps", "3"))
    assert warm_starts == [3]
    capsys.readouterr()
    main(_llm_argv(tmp_path, "--steps", "1", "--sft-steps", "3"))
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"erc-gym llm: {tmp_path}/r already finished: step 1 of 1; nothing to do (a larger "
        "--steps continues it, --restart starts over)"
    ]
    assert json.loads(captured.out)["steps"] == 1
    main(_llm_argv(tmp_path, "--steps", "2", "--sft-steps", "3"))
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"erc-gym llm: resuming {tmp_path}/r from step 1 ({tmp_path}/r/checkpoint.pt)"
    ]
    assert json.loads(captured.out)["steps"] == 2
    assert warm_starts == [3]  # a checkpoint replaces the warm-started weights: not recomputed
    main(_llm_argv(tmp_path, "--steps", "1", "--sft-steps", "3", "--restart"))
    assert warm_starts == [3, 3]


def test_a_truncated_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    """A truncated checkpoint.pt was an OSError traceback after the warm start; the only way
    out offered was --restart."""
    main(_llm_argv(tmp_path, "--steps", "2", "--save-every", "1"))
    run = tmp_path / "r"
    assert torch.load(run / "checkpoint.prev.pt", weights_only=False)["step"] == 1
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    main(_llm_argv(tmp_path, "--steps", "3", "--save-every", "1"))
    err = _stderr_lines(capsys)
    assert len(err) == 1
    assert err[0].startswith(f"erc-gym llm: resuming {run} from step 1 ({run}/checkpoint.prev.pt)")
    assert f"({run}/checkpoint.pt (" in err[0] and "is damaged" in err[0]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 3


def test_damaged_checkpoints_are_named_before_the_warm_start(tmp_path, capsys, warm_starts):
    main(_llm_argv(tmp_path, "--steps", "1", "--sft-steps", "3"))
    run = tmp_path / "r"
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(_llm_argv(tmp_path, "--steps", "2", "--sft-steps", "3"))
    assert exc.value.code == 2
    (line,) = _stderr_lines(capsys)
    assert line.startswith(f"erc-gym llm: error: damaged checkpoint: {run}/checkpoint.pt (")
    assert "no earlier checkpoint is intact; put a good copy back, or start over with" in line
    assert warm_starts == [3]  # refused before the second warm start
    main(_llm_argv(tmp_path, "--steps", "2", "--sft-steps", "3", "--restart"))
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2]


class _AlmostFullDisk:
    """A file on a disk with a few KB left: writes larger than that raise ENOSPC, as a write
    call does (naming no file); small files (config.json) still fit."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        import errno

        if len(data) > 8192:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _fail_checkpoint_writes(monkeypatch):
    """Every file atomic_open writes (a checkpoint: torch.save turns the OSError of its write
    into its own RuntimeError) is on the almost full disk."""
    import builtins

    from erc_gym import atomic

    real = builtins.open
    monkeypatch.setattr(
        atomic, "open", lambda path, mode: _AlmostFullDisk(real(path, mode)), raising=False
    )


def test_checkpoint_on_a_full_disk_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    """A full disk ended in torch's "[enforce fail at inline_container.cc] unexpected pos"."""
    main(_llm_argv(tmp_path, "--steps", "1"))
    run = tmp_path / "r"
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _fail_checkpoint_writes(patch)
        with pytest.raises(SystemExit) as exc:
            main(_llm_argv(tmp_path, "--steps", "3", "--save-every", "1"))
    assert exc.value.code == 1
    err = _stderr_lines(capsys)
    assert err[-1] == (
        f"erc-gym llm: error: cannot write {run}/checkpoint.pt (No space left on device); the "
        f"last checkpoint ({run}/checkpoint.pt, step 1) is intact; resume with: "
        f"{shlex.join(['erc-gym', *_llm_argv(tmp_path, '--steps', '3', '--save-every', '1')])}"
    )
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 1
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    main(_llm_argv(tmp_path, "--steps", "3", "--save-every", "1"))  # the same command resumes
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]


def test_checkpoint_and_export_on_a_real_full_disk(full_disk, capsys):
    filler = full_disk / ".filler"
    room = filler.stat().st_size
    filler.unlink()  # room for the first run
    main(_llm_argv(full_disk, "--steps", "1"))
    run = full_disk / "r"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * room)  # now full, but for a few KB
    capsys.readouterr()
    for steps in ("3", "1"):  # a periodic checkpoint; the final export of a finished run
        with pytest.raises(SystemExit) as exc:
            main(_llm_argv(full_disk, "--steps", steps, "--save-every", "1"))
        assert exc.value.code == 1
        err = _stderr_lines(capsys)
        assert "(No space left on device); the last checkpoint" in err[-1], err
        assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 1
        assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
        (run / "model").rename(full_disk / "moved") if steps == "3" else None
    assert f"cannot write {run}/" in err[-1]


def test_ctrl_c_is_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch):
    """Ctrl-C printed a 76-line traceback and no resume line."""
    real = ERCTrainer.train_step

    def interrupted(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self)

    argv = _llm_argv(tmp_path, "--steps", "4", "--save-every", "2", "--restart")
    with monkeypatch.context() as patch:
        patch.setattr(ERCTrainer, "train_step", interrupted)
        with pytest.raises(SystemExit) as exc:
            main(argv)
    assert exc.value.code == 130
    (line,) = _stderr_lines(capsys)
    again = [a for a in argv if a != "--restart"]
    run = tmp_path / "r"
    assert line == (
        f"erc-gym llm: error: stopped by SIGINT at step 3; the last checkpoint ({run}/"
        f"checkpoint.pt, step 2) is intact; resume with: {shlex.join(['erc-gym', *again])}"
    )
    main(again)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_sigint_to_a_real_process_is_one_line_and_exit_130(tmp_path):
    argv = [sys.executable, "-m", "erc_gym", *_llm_argv(tmp_path, "--steps", "200")]
    proc = subprocess.Popen(
        [*argv, "--save-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (tmp_path / "r" / "checkpoint.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert "stopped by SIGINT at step" in line and "resume with: erc-gym llm" in line
