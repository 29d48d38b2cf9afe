"""A resumed run keeps every finished iteration of its log, whatever the kill left: a torn last
line, or a kill in the middle of the rewrite that cuts the log back to its checkpoint. For the
bandit, sb3 and llm kinds, through the runner and through each trainer's own resume.

Each test stops a run at a checkpoint, appends a line logged after it (its iteration is redone on
resume) and a line cut short by a kill, then resumes while a "kill" lands on the write that cuts
the log back to the checkpoint, then resumes for good.
"""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from erc_gym.bandit import BanditConfig, train_bandit
from erc_gym.lab.runner import run_experiment


class Killed(BaseException):
    """Stands in for SIGKILL: no ``except Exception`` stops it."""


class _DiesOnCutBack:
    """A log file opened for writing (so already truncated): a write of fewer than ``lines``
    complete lines -- the cut back to the checkpoint -- kills the process."""

    def __init__(self, f: Any, lines: int) -> None:
        self.f = f
        self.lines = lines

    def __enter__(self) -> _DiesOnCutBack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, data: Any) -> int:
        text = data if isinstance(data, str) else bytes(data).decode()
        if text.count("\n") >= self.lines:
            return int(self.f.write(data))
        self.f.close()
        raise Killed("killed while rewriting metrics.jsonl")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _kill_on_metrics_cut_back(monkeypatch: pytest.MonkeyPatch, lines: int) -> None:
    """Writes that open the log or a temporary file of it die when they cut it below ``lines``
    complete lines (a repair that only drops the torn line goes through)."""
    real = builtins.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real(file, mode, *args, **kwargs)
        named = isinstance(file, str | os.PathLike) and "metrics.jsonl" in os.fspath(file)
        return _DiesOnCutBack(f, lines) if named and "w" in mode else f

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def _damage(metrics: Path, unsaved: dict[str, Any], torn: str) -> bytes:
    """Append a line logged after the checkpoint and a torn one; return the file's bytes."""
    with open(metrics, "a") as f:
        f.write(json.dumps(unsaved) + "\n" + torn)
    return metrics.read_bytes()


def _resume_through_a_kill(resume, metrics: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    damaged = metrics.read_bytes()
    with monkeypatch.context() as m:
        _kill_on_metrics_cut_back(m, damaged.count(b"\n"))
        with pytest.raises(Killed):
            resume()
    assert metrics.read_bytes() == damaged  # the kill hit a temporary file, not the log
    resume()


def _lines(metrics: Path) -> list[bytes]:
    return metrics.read_bytes().splitlines(keepends=True)


def _kept(before: bytes, metrics: Path, key: str, upto: float) -> None:
    """The log's lines up to the checkpoint are the ones written before the kill, byte for
    byte, and each later iteration appears once."""
    old = [ln for ln in before.splitlines(keepends=True)[:-2]]
    after = _lines(metrics)
    assert after[: len(old)] == old
    counters = [json.loads(x).get(key) for x in after if key in json.loads(x)]
    assert counters == sorted(set(counters)) and max(counters) > upto


BANDIT = {"vocab_size": 64, "num_contexts": 4, "iterations": 4, "group": 4, "minibatches": 2}


def test_bandit_own_resume(tmp_path, monkeypatch):
    config = BanditConfig(**BANDIT, save_every=1, erc_low=0.95, erc_high=1.05)
    train_bandit(config, tmp_path / "straight")
    folder = tmp_path / "run"
    train_bandit(config, folder, max_iterations=2)
    metrics = folder / "metrics.jsonl"
    before = _damage(metrics, {"step": 48, "iteration": 3}, '{"step": 64, "itera')
    _resume_through_a_kill(lambda: train_bandit(config, folder), metrics, monkeypatch)
    _kept(before, metrics, "iteration", 2)
    assert metrics.read_bytes() == (tmp_path / "straight" / "metrics.jsonl").read_bytes()


def _stopped_grid_run(spec: dict[str, Any], root: Path, stop: int, monkeypatch) -> Path:
    monkeypatch.setenv("ERC_GYM_STOP_AFTER", str(stop))
    with pytest.raises(RuntimeError, match="stopped after"):
        run_experiment(spec, root, workers=1, progress=False)
    monkeypatch.delenv("ERC_GYM_STOP_AFTER")
    ((folder),) = [p for p in (root / spec["name"]).glob("*/*") if p.is_dir()]
    assert not (folder / "done").exists()
    return folder


def test_bandit_through_the_runner(tmp_path, monkeypatch):
    spec = {
        "name": "b",
        "kind": "bandit",
        "seeds": 1,
        "algorithms": ["ppo"],
        "erc": [[0.95, 1.05]],
        "envs": [{"label": "V64", **BANDIT}],
        "settings": {"save_every": 1},
    }
    (straight,) = run_experiment({**spec, "name": "s"}, tmp_path, workers=1, progress=False)
    folder = _stopped_grid_run(spec, tmp_path, 2, monkeypatch)
    metrics = folder / "metrics.jsonl"
    before = _damage(metrics, {"step": 48, "iteration": 3}, '{"step": 64, "itera')
    run = lambda: run_experiment(spec, tmp_path, workers=1, progress=False)  # noqa: E731
    _resume_through_a_kill(run, metrics, monkeypatch)
    assert (folder / "done").exists()
    _kept(before, metrics, "iteration", 2)
    assert metrics.read_bytes() == (straight / "metrics.jsonl").read_bytes()


def test_sb3_through_the_runner(tmp_path, monkeypatch):
    spec = {
        "name": "cp",
        "kind": "sb3",
        "seeds": 1,
        "algorithms": ["ppo"],
        "erc": [[0.95, 1.05]],
        "envs": [{"label": "CartPole", "id": "CartPole-v1"}],
        "settings": {"steps": 1024, "eval_every": 512, "eval_episodes": 2},
    }
    folder = _stopped_grid_run(spec, tmp_path, 512, monkeypatch)
    metrics = folder / "metrics.jsonl"
    unsaved = {"time/total_timesteps": 768, "train/entropy": -1.0}
    before = _damage(metrics, unsaved, '{"time/total_timesteps": 1024, "train/ent')
    run = lambda: run_experiment(spec, tmp_path, workers=1, progress=False)  # noqa: E731
    _resume_through_a_kill(run, metrics, monkeypatch)
    assert (folder / "done").exists()
    rows = [json.loads(x) for x in _lines(metrics)]
    assert -1.0 not in [r.get("train/entropy") for r in rows]  # the unsaved update was redone
    assert [r["time/total_timesteps"] for r in rows if "eval/mean_reward" in r] == [512, 1024, 1024]
    old = before.splitlines(keepends=True)[:-2]
    assert _lines(metrics)[: len(old)] == old


def _llm_settings() -> dict[str, Any]:
    return {
        "sft_steps": 0,
        "steps": 4,
        "group_size": 4,
        "prompts_per_step": 4,
        "mini_batch_prompts": 2,
        "max_new_tokens": 3,
        "num_train": 64,
        "num_eval": 4,
        "eval_every": 2,
        "save_every": 1,
    }


def test_llm_own_resume(tmp_path, monkeypatch):
    from erc_gym.llm import ERCTrainer, TrainerConfig

    settings = {**_llm_settings(), "device": "cpu", "progress": False}
    config = TrainerConfig(**settings, run_dir=str(tmp_path), erc_low=0.95, erc_high=1.05)
    ERCTrainer(config).train(max_steps=2)
    metrics = tmp_path / "llm" / "metrics.jsonl"
    before = _damage(metrics, {"step": 3, "reward": 0.5}, '{"step": 4, "rew')
    _resume_through_a_kill(lambda: ERCTrainer(config).train(), metrics, monkeypatch)
    _kept(before, metrics, "step", 2)
    assert [json.loads(x)["step"] for x in _lines(metrics)] == [0, 1, 2, 3, 4]


def test_llm_through_the_runner(tmp_path, monkeypatch):
    spec = {
        "name": "lm",
        "kind": "llm",
        "seeds": 1,
        "algorithms": ["dapo"],
        "erc": [[0.95, 1.05]],
        "envs": [{"label": "add1", "model": "tiny"}],
        "settings": _llm_settings(),
    }
    folder = _stopped_grid_run(spec, tmp_path, 2, monkeypatch)
    metrics = folder / "metrics.jsonl"
    before = _damage(metrics, {"step": 3, "reward": 0.5}, '{"step": 4, "rew')
    run = lambda: run_experiment(spec, tmp_path, workers=1, progress=False)  # noqa: E731
    _resume_through_a_kill(run, metrics, monkeypatch)
    assert (folder / "done").exists()
    _kept(before, metrics, "step", 2)
    assert [json.loads(x)["step"] for x in _lines(metrics)] == [0, 1, 2, 3, 4]
