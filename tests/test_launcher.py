"""What a grid asks a cluster for, and ``--launcher`` without Ray: no Ray needed here (the Ray
launcher on a real cluster: ``tests/test_ray.py``, ``make test-ray``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from erc_gym.lab.config import ConfigError, validate_experiment
from erc_gym.lab.grid import expand
from erc_gym.lab.kinds import get_kind
from erc_gym.lab.ray_launcher import INSTALL_HINT, _task_options, run_resources

BASE = {"name": "r", "kind": "bandit", "algorithms": ["ppo"], "envs": [{"vocab_size": 64}]}


@pytest.mark.parametrize(
    ("kind", "trainer", "request_"),
    [
        ("bandit", {}, {"CPU": 1}),
        ("sb3", {}, {"CPU": 1}),
        ("llm", {"device": "cpu"}, {"CPU": 1}),
        ("llm", {"device": "auto"}, {"CPU": 1}),
        ("llm", {"device": "cuda"}, {"CPU": 1, "GPU": 1}),
        ("llm", {"device": "cuda:1"}, {"CPU": 1, "GPU": 1}),
    ],
)
def test_each_kind_asks_for_what_a_run_uses(kind, trainer, request_):
    assert get_kind(kind).resources(trainer) == request_


def test_the_config_overrides_the_kind_key_by_key():
    spec = validate_experiment({**BASE, "resources": {"GPU": 0.5, "memory": 2e9, "fast": 1}})
    assert spec["resources"] == {"GPU": 0.5, "memory": 2e9, "fast": 1}
    (run, *_) = expand(spec)
    request = run_resources(run, spec["resources"])
    assert request == {"CPU": 1, "GPU": 0.5, "memory": 2e9, "fast": 1}
    assert _task_options(request) == {
        "num_cpus": 1,
        "num_gpus": 0.5,
        "memory": 2_000_000_000,
        "resources": {"fast": 1},
    }
    assert run_resources(run, None) == {"CPU": 1}


def test_a_config_without_resources_records_none():
    assert "resources" not in validate_experiment(BASE)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"CPU": -1}, "resources.CPU = -1: Input should be greater than or equal to 0"),
        ({"GPU": 1.5}, "resources.GPU = 1.5: Ray takes a fraction below 1 or a whole number"),
        ({"CPU": "2"}, "resources.CPU = '2': Input should be a valid integer"),
        ({"GPU": float("inf")}, "resources.GPU = inf: Input should be a finite number"),
        ({"": 1}, "resources: a resource name is a non-empty string"),
        ([1], "resources = [1]: Input should be a valid dictionary"),
    ],
)
def test_bad_resources_are_one_line(resources, message):
    with pytest.raises(ConfigError) as err:
        validate_experiment({**BASE, "resources": resources}, "c.json")
    assert str(err.value) == f"c.json: {message}"


def _experiment(tmp_path, *args: str, hide_ray: bool = False) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['ray'] = None; " if hide_ray else ""
    code = f"{prelude}from erc_gym.cli import main; main()"
    cmd = [sys.executable, "-c", code, "experiment", "quick", "--runs", str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_without_ray_the_ray_launcher_says_how_to_install_it(tmp_path):
    done = _experiment(tmp_path / "runs", "--launcher", "ray", hide_ray=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"erc-gym experiment: error: {INSTALL_HINT}"]
    assert INSTALL_HINT == "the ray launcher needs Ray: pip install 'erc-gym[ray]'"
    assert not (tmp_path / "runs").exists()  # nothing written, nothing trained


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", "10.0.0.1:6379"], "--address needs --launcher ray"),
        (["--launcher", "ray", "--workers", "2"], "--workers is for the local launcher"),
        (["--launcher", "slurm"], "argument --launcher: invalid choice: 'slurm'"),
    ],
)
def test_launcher_options_that_do_not_fit_are_one_line(tmp_path, args, message):
    done = _experiment(tmp_path / "runs", *args, hide_ray=True)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"erc-gym experiment: error: {message}")
    assert not (tmp_path / "runs").exists()
