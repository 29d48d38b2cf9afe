"""Every shipped experiment config expands to the same grid and the same run records as the
code the fixture was generated from: the validated ``experiment.json``, ``expand(...)`` and each
run's ``run.json`` (the text the runner writes), byte for byte.

Regenerate the fixture only for an intended change of a grid or of a trainer's settings:
``python tests/test_grid_fixture.py > tests/data/grid_fixture.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from erc_gym.lab.config import CONFIG_DIR, load_experiment
from erc_gym.lab.grid import expand
from erc_gym.lab.rundir import resolved_config

FIXTURE = Path(__file__).parent / "data" / "grid_fixture.json"


def snapshot(name: str) -> dict[str, object]:
    """What the runner records for the shipped config ``name``, as text."""
    spec = load_experiment(name)
    runs = expand(spec)
    return {
        "experiment.json": json.dumps(spec, indent=2),
        "expand": json.dumps([dataclasses.asdict(r) for r in runs]),
        "run.json": {
            f"{r.variant}/{r.seed}": json.dumps(resolved_config(r), indent=2) for r in runs
        },
    }


def shipped() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def test_every_shipped_config_is_in_the_fixture() -> None:
    assert sorted(json.loads(FIXTURE.read_text())) == shipped()


@pytest.mark.parametrize("name", shipped())
def test_grid_and_run_records_are_unchanged(name: str) -> None:
    expected = json.loads(FIXTURE.read_text())[name]
    now = snapshot(name)
    assert now["experiment.json"] == expected["experiment.json"]
    assert now["expand"] == expected["expand"]
    assert sorted(now["run.json"]) == sorted(expected["run.json"])  # type: ignore[arg-type]
    for key, text in expected["run.json"].items():
        assert now["run.json"][key] == text, key  # type: ignore[index]


if __name__ == "__main__":
    json.dump({name: snapshot(name) for name in shipped()}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
