"""A trainer kind is one module plus one registry line: a toy kind defined here runs a 2 x 2 grid
through ``erc-gym experiment`` (two worker processes) and ``erc-gym report``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, create_model

from erc_gym.cli import main
from erc_gym.jsonl import append_jsonl, truncate_metrics
from erc_gym.lab import kinds
from erc_gym.lab.grid import RunSpec, expand
from erc_gym.lab.kinds import get_kind, kind_names, register_kind
from erc_gym.lab.kinds.base import check_stopped


class ToyKind:
    """A trainer that needs no library: its score rises by ``lr`` per step, its entropy falls;
    ERC (any band) halves the step. Checkpoints are the last step written to ``state.json``."""

    name = "toy"
    score_label = "toy score"
    step_label = "toy steps"
    series_keys: ClassVar[dict[str, str]] = {"step": "step", "score": "score", "entropy": "entropy"}

    def settings_model(self) -> type[BaseModel]:
        return create_model(
            "ToySettings",
            __config__=ConfigDict(extra="forbid", strict=True),
            steps=(StrictInt, 4),
            lr=(StrictFloat, 0.1),
            inner=(StrictInt, 1),
        )

    def check(self, settings: dict, algorithms: Sequence[str], bands: Sequence[Any]) -> None:
        if settings.get("lr", 0.1) <= 0:
            raise ValueError(f"lr must be > 0, got lr={settings['lr']}")

    def axis_settings(self, env: dict, settings: dict, point: dict) -> dict:
        out = dict(settings)
        if "steps_per_rollout" in point:
            out["inner"] = int(point["steps_per_rollout"])
        if "lr" in point:
            out["lr"] = float(point["lr"])
        return out

    def trainer_config(self, run: RunSpec) -> dict[str, Any]:
        settings = {"steps": 4, "lr": 0.1, "inner": 1, **run.settings, **run.env}
        return {**settings, "algorithm": run.algorithm, "erc": run.erc, "seed": run.seed}

    def budget(self, trainer: dict[str, Any]) -> tuple[str, float]:
        return "step", float(trainer["steps"])

    def train(self, run: RunSpec, folder: Path, resume: bool, stop_after: int | None) -> None:
        config = self.trainer_config(run)
        state = folder / "state.json"
        start = json.loads(state.read_text())["step"] if resume and state.exists() else 0
        truncate_metrics(folder / "metrics.jsonl", "step", start)
        last = config["steps"] if stop_after is None else min(stop_after, config["steps"])
        rate = config["lr"] * (0.5 if run.erc is not None else 1.0)
        for step in range(start + 1, last + 1):
            row = {"step": step, "score": rate * step + 0.01 * run.seed, "entropy": 2.0 / step}
            append_jsonl(folder / "metrics.jsonl", row)
            state.write_text(json.dumps({"step": step}))
        check_stopped(stop_after, config["steps"])


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(kinds, "_REGISTERED", {})  # registrations end with the test
    return register_kind(ToyKind())  # the one registry line


def test_a_toy_kind_runs_a_grid_through_experiment_and_report(toy, tmp_path, capsys):
    config = tmp_path / "toy.json"
    config.write_text(
        json.dumps(
            {
                "name": "toy",
                "description": "a kind defined in a test",
                "kind": "toy",
                "seeds": 2,
                "algorithms": ["ppo", "dapo"],
                "erc": [None, [0.95, 1.05]],
                "envs": [{"label": "T"}],
                "settings": {"steps": 5, "lr": 0.2},
            }
        )
    )
    runs = tmp_path / "runs"
    argv = ["experiment", str(config), "--runs", str(runs), "--workers", "2", "--no-progress"]
    main(argv)
    assert "report:" in capsys.readouterr().out
    folder = runs / "toy"
    variants = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "figures")
    assert variants == ["T-dapo", "T-dapo-erc0.95-1.05", "T-ppo", "T-ppo-erc0.95-1.05"]
    for variant in variants:
        for seed in (0, 1):
            run = folder / variant / str(seed)
            assert (run / "done").exists()
            record = json.loads((run / "run.json").read_text())
            assert record["kind"] == "toy" and record["trainer"]["steps"] == 5
    main(["report", str(folder)])
    report = (folder / "report.md").read_text()
    assert "Score: toy score." in report
    for variant in variants:
        assert f"| {variant} | 2/2 |" in report
    # the ERC runs score half as much (0.5 * 0.2 * 5 = 0.5, vs 1.0), as the toy trainer says
    assert "| T-ppo-erc0.95-1.05 | 2/2 | 0.105 | 0.505 [0.5, 0.51] |" in report
    assert (folder / "figures" / "T_curves.png").exists()


def test_a_registered_kind_is_checked_by_the_schema_like_the_built_in_ones(toy, tmp_path):
    from erc_gym.lab.config import ConfigError, validate_experiment

    spec = {"name": "t", "kind": "toy", "seeds": 1, "algorithms": ["ppo"], "envs": [{"label": "T"}]}
    assert validate_experiment(spec)["kind"] == "toy"
    with pytest.raises(ConfigError, match=r"settings: lr = 'x': Input should be a valid number"):
        validate_experiment({**spec, "settings": {"lr": "x"}})
    with pytest.raises(ConfigError, match=r"T\) / settings: lr must be > 0, got lr=-1.0"):
        validate_experiment({**spec, "settings": {"lr": -1.0}})
    with pytest.raises(ConfigError, match="kind = 'toys': Input should be 'sb3', 'bandit', 'llm'"):
        validate_experiment({**spec, "kind": "toys"})
    axes = {"steps_per_rollout": [1, 3], "lr": [0.5]}
    grid = expand(validate_experiment({**spec, "axes": axes}))
    assert [(r.variant, r.settings["inner"]) for r in grid] == [
        ("T-ppo-s1-lr0.5", 1),
        ("T-ppo-s3-lr0.5", 3),
    ]


def test_unknown_kinds_are_one_line_errors():
    assert kind_names()[:3] == ["sb3", "bandit", "llm"]
    with pytest.raises(ValueError, match=r"kind must be 'bandit', 'llm' or 'sb3', got 'nope'"):
        get_kind("nope")


@pytest.mark.parametrize("name", ["bandit", "sb3", "llm"])
def test_built_in_kinds_follow_the_protocol(name):
    kind = get_kind(name)
    assert kind.name == name
    assert {"step", "score", "entropy"} <= set(kind.series_keys)
    assert kind.score_label and kind.step_label
    assert math.isfinite(kind.budget({"steps": 3, "iterations": 3})[1])
