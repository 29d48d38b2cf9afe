"""A resumed run keeps every finished iteration of its log, whatever the kill left: a torn last
line, or a kill in the middle of the rewrite that cuts the log back to its checkpoint. For the
bandit, sb3 and llm kinds, through the runner and through each trainer's own resume.

Each test stops a run at a checkpoint, appends a line logged after it (its iteration is redone on
resume) and a line cut short by a kill, then resumes while a "kill" lands on the write that cuts
the log back to the checkpoint, then resumes for good.
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from erc_gym.bandit import BanditConfig, train_bandit
from erc_gym.lab.kinds.base import GRID_KEYS
from erc_gym.lab.kinds.llm import LLMKind
from erc_gym.lab.runner import run_experiment

sys.path.insert(0, str(Path(__file__).parent / "llm"))
from test_trainer import small_config


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


def test_llm_own_resume(tmp_path, monkeypatch):
    from erc_gym.llm import ERCTrainer

    config = small_config(tmp_path, steps=4, eval_every=2, save_every=1)
    ERCTrainer(config).train(max_steps=2)
    metrics = tmp_path / "llm" / "metrics.jsonl"
    before = _damage(metrics, {"step": 3, "reward": 0.5}, '{"step": 4, "rew')
    _resume_through_a_kill(lambda: ERCTrainer(config).train(), metrics, monkeypatch)
    _kept(before, metrics, "step", 2)
    assert [json.loads(x)["step"] for x in _lines(metrics)] == [0, 1, 2, 3, 4]


def _llm_grid_settings() -> dict[str, Any]:
    """The LLM tests' small config as grid settings (what the grid and the runner set removed)."""
    config = dataclasses.asdict(small_config(Path("."), steps=4, eval_every=2, save_every=1))
    return {k: v for k, v in config.items() if k not in GRID_KEYS | LLMKind.runner_keys}


#: kind -> env, settings, the checkpoint's counter value, a line logged after it and a torn one,
#: and what the finished log holds: the rows with ``field``, by ``counter``.
GRIDS: dict[str, tuple[Any, ...]] = {
    "bandit": (
        {"label": "V64", **BANDIT, "save_every": 1},
        {},
        2,
        ({"step": 48, "iteration": 3}, '{"step": 64, "itera'),
        ("iteration", "iteration", [0, 1, 2, 3, 4]),
    ),
    "sb3": (
        {"label": "CartPole", "id": "CartPole-v1"},
        {"steps": 1024, "eval_every": 512, "eval_episodes": 2},
        512,
        ({"time/total_timesteps": 768, "train/entropy": -1.0}, '{"time/total_timesteps": 10'),
        ("eval/mean_reward", "time/total_timesteps", [512, 1024, 1024]),  # the final eval twice
    ),
    "llm": (
        {"label": "add1", "model": "tiny"},
        None,  # _llm_grid_settings()
        2,
        ({"step": 3, "reward": 0.5}, '{"step": 4, "rew'),
        ("step", "step", [0, 1, 2, 3, 4]),
    ),
}


@pytest.mark.parametrize("kind", sorted(GRIDS))
def test_resume_through_the_runner(kind, tmp_path, monkeypatch):
    env, settings, stop, (unsaved, torn), (field, counter, expected) = GRIDS[kind]
    settings = _llm_grid_settings() if settings is None else settings
    spec = {"name": kind, "kind": kind, "seeds": 1, "algorithms": ["ppo"], "erc": [[0.95, 1.05]]}
    spec |= {"envs": [env], "settings": settings}
    monkeypatch.setenv("ERC_GYM_STOP_AFTER", str(stop))
    with pytest.raises(RuntimeError, match="stopped after"):
        run_experiment(spec, tmp_path, workers=1, progress=False)
    monkeypatch.delenv("ERC_GYM_STOP_AFTER")
    (folder,) = [p for p in (tmp_path / kind).glob("*/*") if p.is_dir()]
    metrics = folder / "metrics.jsonl"
    before = _damage(metrics, unsaved, torn)
    run = lambda: run_experiment(spec, tmp_path, workers=1, progress=False)  # noqa: E731
    _resume_through_a_kill(run, metrics, monkeypatch)
    assert (folder / "done").exists()
    old = before.splitlines(keepends=True)[:-2]  # the lines up to the checkpoint
    assert _lines(metrics)[: len(old)] == old
    rows = [json.loads(x) for x in _lines(metrics)]
    assert unsaved not in rows  # the iteration after the checkpoint was done again
    assert [r[counter] for r in rows if field in r] == expected
    if kind == "bandit":  # deterministic: the same log as a run never stopped
        (straight,) = run_experiment({**spec, "name": "s"}, tmp_path, workers=1, progress=False)
        assert metrics.read_bytes() == (straight / "metrics.jsonl").read_bytes()
