"""The Ray launcher on a real Ray cluster of two nodes on 127.0.0.1 (``make test-ray``).

The cluster: a head started by ``ray start --head --block`` and a worker node
(``tests/ray_node.py``), each with one CPU, so a grid's runs land on both. Ray is kept on loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: every Ray process binds 127.0.0.1) and in a temporary
folder of its own. The worker node runs in a mount namespace of its own, where an empty tmpfs
covers one folder: a runs folder there is one that the node cannot see.

Every grid goes through ``erc-gym experiment --launcher ray --address ...`` in a child process
(the driver), and is compared with the local launcher's grid of the same config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from erc_gym.lab.kinds.base import GRID_KEYS
from erc_gym.lab.kinds.llm import LLMKind
from erc_gym.lab.runner import run_experiment

sys.path.insert(0, str(Path(__file__).parent / "llm"))
from test_trainer import small_config

# Ray on loopback, in this process (before Ray reads it on import) and in the drivers started here
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# a loaded machine: Ray 2.40's head gives up when its raylet takes over 10 s to register
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
pytest.importorskip("ray")
import ray._private.ray_constants as ray_constants

ray_constants.ENABLE_RAY_CLUSTER = False  # the same, had another module imported Ray first

#: Keys of a log line that time the run (they differ between any two runs).
TIMING = {
    "time/fps",
    "time/time_elapsed",
    "time_generate",
    "time_score",
    "time_train",
    "time/train_seconds",
    "tokens_per_second",
}
#: Seconds a command may take before the test gives up on it.
LIMIT_S = 600


@dataclasses.dataclass
class Cluster:
    address: str
    hidden: Path | None  # a folder the worker node cannot see (None: no mount namespace here)
    temp: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


def _alive_nodes(address: str) -> int:
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='error', "
        "log_to_driver=False); print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    counts = [line.split()[-1] for line in out.stdout.splitlines() if "alive nodes:" in line]
    return int(counts[-1]) if out.returncode == 0 and counts else 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp = Path(tempfile.mkdtemp(prefix="erc-ray-"))  # short: Ray's socket paths live below it
    port = _free_port()
    address = f"127.0.0.1:{port}"
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--object-store-memory={80 * 2**20}",
            "--disable-usage-stats",
            f"--temp-dir={temp / 'ray'}",
        ],
        stdout=(temp / "head.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    hidden: Path | None = temp / "hidden"
    node_cmd = [sys.executable, str(Path(__file__).parent / "ray_node.py"), address, "1"]
    if _can_unshare():
        assert hidden is not None
        hidden.mkdir()
        node_cmd = ["unshare", "--mount", "--propagation", "private", *node_cmd, str(hidden)]
    else:
        hidden = None
    node = None
    try:
        deadline = time.monotonic() + 240
        while True:  # the head's GCS answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "no Ray head"
                time.sleep(0.5)
        for nodes in (1, 2):  # the head's own node first (older Rays mix up two new nodes)
            if nodes == 2:
                node = subprocess.Popen(node_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                assert node.stdout is not None and node.stdout.readline(), "no worker node"
            while _alive_nodes(address) < nodes:
                log = (temp / "head.log").read_text()[-2000:]
                assert time.monotonic() < deadline and head.poll() is None, f"no cluster:\n{log}"
                time.sleep(1)
        yield Cluster(address, hidden, temp)
    finally:
        if node is not None:
            assert node.stdin is not None
            node.stdin.close()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        head.terminate()  # `ray start --block` stops the head's processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Helpers


def _llm_settings() -> dict[str, Any]:
    config = dataclasses.asdict(small_config(Path("."), steps=3, eval_every=1, save_every=1))
    return {k: v for k, v in config.items() if k not in GRID_KEYS | LLMKind.runner_keys}


#: A 2 x 2 grid of each kind (ERC off / on, two seeds), tiny.
GRIDS: dict[str, dict[str, Any]] = {
    "bandit": {
        "envs": [{"label": "V64", "vocab_size": 64, "num_contexts": 4}],
        "settings": {"iterations": 6, "group": 4, "minibatches": 2, "save_every": 2},
    },
    "sb3": {
        "envs": [{"label": "CartPole", "id": "CartPole-v1"}],
        "settings": {"steps": 256, "eval_every": 128, "eval_episodes": 2, "n_steps": 64},
    },
    "llm": {"envs": [{"label": "add1", "model": "tiny"}], "settings": None},
}

#: A bandit grid whose runs take about 2.5 s each on an idle 2-core machine (a checkpoint after
#: every iteration), long enough to interrupt in the middle: the tests below wait for runs that
#: have logged a few iterations and have not finished.
LONG_BANDIT = {"iterations": 200, "save_every": 1}


def _spec(name: str, kind: str, seeds: int = 2, **grid: Any) -> dict[str, Any]:
    base = GRIDS.get(kind, {})
    settings = grid.pop("settings", base.get("settings"))
    return {
        "name": name,
        "kind": kind,
        "seeds": seeds,
        "algorithms": ["ppo"],
        "erc": [None, [0.95, 1.05]],
        "envs": grid.pop("envs", base.get("envs")),
        "settings": _llm_settings() if settings is None else settings,
        **grid,
    }


def _experiment(
    spec: dict[str, Any], runs: Path, cluster: Cluster, *extra: str, wait: bool = True
) -> Any:
    """``erc-gym experiment <config> --launcher ray --address <cluster>`` in a child process."""
    config = runs.parent / f"{spec['name']}-{runs.name}.json"
    config.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "erc_gym", "experiment", str(config), "--runs", str(runs)]
    cmd += ["--launcher", "ray", "--address", cluster.address, "--no-report", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run_folders(root: Path, name: str) -> list[Path]:
    return sorted(p for p in (root / name).glob("*/*") if p.is_dir())


def _lock_holders(folders: list[Path]) -> dict[Path, int]:
    """Run folder -> pid of the process holding its lock (its trainer), on this machine."""
    locks = {str(f / ".lock"): f for f in folders}
    out = {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target in locks:
                    out[locks[target]] = int(fd_dir.parent.name)
        except OSError:
            continue
    return out


def _our_tasks() -> list[int]:
    """Pids of Ray workers running a task of ours (Ray titles them ``ray::<task name>``)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::erc-gym"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _training(folders: list[Path], lines: int) -> list[Path]:
    """The folders whose run has logged at least ``lines`` lines and has not finished."""
    return [
        f for f in folders if _lines(f / "metrics.jsonl") >= lines and not (f / "done").exists()
    ]


#: A key added to the first line of a run's log: a run that resumes keeps the lines up to its
#: checkpoint as they are, one that started over would not have it.
MARK = "test_marker"


def _mark(metrics: Path) -> None:
    """Add :data:`MARK` to the first line of ``metrics`` (replaced atomically)."""
    lines = metrics.read_text().splitlines(keepends=True)
    lines[0] = json.dumps({**json.loads(lines[0]), MARK: True}) + "\n"
    tmp = metrics.with_name("marked.tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, metrics)


def _resumed(metrics: Path) -> bool:
    return _rows(metrics)[0].get(MARK) is True


def _untimed(path: Path) -> list[dict[str, Any]]:
    skip = TIMING | {MARK}
    return [{k: v for k, v in row.items() if k not in skip} for row in _rows(path)]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# The grid on the cluster equals the local grid


@pytest.mark.parametrize("kind", ["bandit", "sb3", "llm"])
def test_a_grid_on_the_cluster_equals_the_local_grid(cluster, kind, tmp_path):
    spec = _spec(f"grid-{kind}", kind)
    local = run_experiment(spec, tmp_path / "local", workers=1, progress=False)
    done = _experiment(spec, tmp_path / "ray", cluster)
    assert done.returncode == 0, done.stderr
    assert "4.0/4 runs" in done.stderr  # the progress bar, moved to the end
    remote = _run_folders(tmp_path / "ray", spec["name"])
    assert [p.relative_to(tmp_path / "ray") for p in remote] == [
        p.relative_to(tmp_path / "local") for p in local
    ]
    for here, there in zip(local, remote, strict=True):
        assert (there / "done").exists()
        assert _untimed(there / "metrics.jsonl") == _untimed(here / "metrics.jsonl"), there
        assert (there / "run.json").read_bytes() == (here / "run.json").read_bytes()
    assert not list((tmp_path / "ray").glob(".erc-gym-probe-*"))  # the probe files are gone
    logs = {f: (f / "metrics.jsonl").stat().st_mtime_ns for f in remote}
    again = _experiment(spec, tmp_path / "ray", cluster)  # finished: nothing trains again
    assert again.returncode == 0, again.stderr
    assert {f: (f / "metrics.jsonl").stat().st_mtime_ns for f in remote} == logs


# ---------------------------------------------------------------------------------------------
# Faults


def test_a_killed_worker_is_retried_from_its_checkpoint(cluster, tmp_path):
    spec = _spec("kill", "bandit", seeds=1, erc=[[0.95, 1.05]], settings=LONG_BANDIT)
    (reference,) = run_experiment(spec, tmp_path / "local", workers=1, progress=False)
    driver = _experiment(spec, tmp_path / "ray", cluster, wait=False)
    folder = tmp_path / "ray" / "kill" / reference.parent.name / "0"
    metrics = folder / "metrics.jsonl"
    _wait_for(lambda: _training([folder], 5), 300, "five iterations")
    holders = _lock_holders([folder])
    pid = holders[folder]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::erc-gym")
    os.kill(pid, signal.SIGSTOP)  # the Ray worker process training the run: frozen, marked,
    _mark(metrics)
    before = metrics.read_bytes()
    os.kill(pid, signal.SIGKILL)  # and killed
    _, err = driver.communicate(timeout=LIMIT_S)
    assert driver.returncode == 0, err
    assert f"retrying {folder} from its last checkpoint (1/3): its Ray worker died" in err
    assert (
        f"1 run(s) retried after their worker died, each resuming from its last checkpoint: "
        f"{folder} (1x)" in err
    )
    assert _resumed(metrics)  # from its checkpoint: the lines up to it stayed as they were
    rows = _rows(metrics)
    assert [r["iteration"] for r in rows] == list(range(len(rows)))  # no line twice
    assert metrics.read_bytes()[: before.find(b"\n")] == before[: before.find(b"\n")]
    assert _untimed(metrics) == _untimed(reference / "metrics.jsonl")  # nothing lost


def test_a_run_failing_on_its_own_is_reported_and_the_others_go_on(cluster, tmp_path):
    spec = _spec("own", "bandit", seeds=1)  # two runs: ERC off and on
    bad = tmp_path / "ray" / "own" / "V64-ppo" / "0"
    bad.mkdir(parents=True)
    (bad / "checkpoint.pt").write_bytes(b"damaged")  # its trainer raises when it resumes
    done = _experiment(spec, tmp_path / "ray", cluster)
    assert done.returncode == 1
    assert f"failed: {bad}: " in done.stderr and "damaged" in done.stderr  # its own one line
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"erc-gym experiment: error: 1 of 2 runs failed, e.g. {bad}: ")
    assert "Traceback" in (bad / "error.log").read_text()
    assert (tmp_path / "ray" / "own" / "V64-ppo-erc0.95-1.05" / "0" / "done").exists()
    assert "retrying" not in done.stderr  # its own error is not a fault of the cluster


# ---------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_every_task_and_the_same_command_resumes(cluster, signum, tmp_path):
    spec = _spec(f"stop{signum}", "bandit", settings=LONG_BANDIT)  # 4 runs, 2 at a time
    local = run_experiment(spec, tmp_path / "local", workers=1, progress=False)
    runs = tmp_path / "ray"
    driver = _experiment(spec, runs, cluster, wait=False)
    folders = [runs / p.relative_to(tmp_path / "local") for p in local]
    _wait_for(lambda: len(_training(folders, 3)) >= 2, 300, "2 runs in training")
    assert len(_our_tasks()) >= 2
    driver.send_signal(signum)
    start = time.monotonic()
    _wait_for(lambda: not _our_tasks() and not _lock_holders(folders), 10, "tasks to stop")
    stopped_after = time.monotonic() - start
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"erc-gym experiment: stopped by {name}: ")
    assert "stopped at their last checkpoint; resume with: erc-gym experiment " in last
    print(f"{name}: no task of ours ran {stopped_after:.2f} s after the signal")
    finished = {f: (f / "metrics.jsonl").read_bytes() for f in folders if (f / "done").exists()}
    partial = [f for f in folders if f not in finished and (f / "metrics.jsonl").exists()]
    assert partial and all((f / "checkpoint.pt").exists() for f in partial)
    for f in partial:
        _mark(f / "metrics.jsonl")
    logs = {f: (f / "metrics.jsonl").read_bytes() for f in partial}
    time.sleep(2)
    assert {f: (f / "metrics.jsonl").read_bytes() for f in partial} == logs  # none trains on
    again = _experiment(spec, runs, cluster)
    assert again.returncode == 0, again.stderr
    for f, text in finished.items():  # finished runs are not trained again
        assert (f / "metrics.jsonl").read_bytes() == text
    for f in partial:  # the others resumed from their checkpoints, each iteration logged once
        assert _resumed(f / "metrics.jsonl")
        rows = _rows(f / "metrics.jsonl")
        assert [r["iteration"] for r in rows] == list(range(len(rows)))
    for here, there in zip(local, folders, strict=True):
        assert (there / "done").exists()
        assert _untimed(there / "metrics.jsonl") == _untimed(here / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# The runs folder


def test_a_runs_folder_that_a_node_cannot_see_is_refused(cluster, tmp_path):
    if cluster.hidden is None:
        pytest.skip("needs mount namespaces (unshare --mount) for a folder one node cannot see")
    runs = cluster.hidden / "runs"
    runs.mkdir()
    done = _experiment(_spec("blind", "bandit"), runs, cluster, "--no-progress")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith(f"erc-gym experiment: error: the runs folder {runs} is not visible ")
    assert "from Ray node 127.0.0.1 (node " in line
    assert not [p for p in runs.rglob("*") if p.is_dir() and p.parent.parent.name == "blind"]
    assert not list(runs.glob(".erc-gym-probe-*"))


def test_mixed_local_and_ray_commands_train_each_run_once(cluster, tmp_path):
    spec = _spec("mixed", "bandit", settings={**LONG_BANDIT, "iterations": 20})
    local = run_experiment(spec, tmp_path / "local", workers=1, progress=False)
    runs = tmp_path / "runs"
    on_ray = _experiment(spec, runs, cluster, wait=False)
    config = tmp_path / f"mixed-{runs.name}.json"
    _wait_for(lambda: config.exists() and _our_tasks(), 120, "the Ray grid to start")
    here = subprocess.run(
        [
            sys.executable,
            "-m",
            "erc_gym",
            "experiment",
            str(config),
            "--runs",
            str(runs),
            "--workers",
            "1",
            "--no-report",
        ],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    _, err = on_ray.communicate(timeout=LIMIT_S)
    assert here.returncode == 0 and on_ray.returncode == 0, (here.stderr, err)
    skipped = here.stderr.count("skipped: ") + err.count("skipped: ")
    assert skipped >= 1  # the two commands met on a run, and one left it to the other
    for there, ref in zip(_run_folders(runs, "mixed"), local, strict=True):
        rows = _rows(there / "metrics.jsonl")
        assert [r["iteration"] for r in rows] == list(range(len(rows)))
        assert _untimed(there / "metrics.jsonl") == _untimed(ref / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# The Python API, and what is refused before anything runs


def test_the_python_api_runs_a_grid_on_the_cluster(cluster, tmp_path):
    import signal as signals

    from erc_gym.lab.ray_launcher import RayLauncher

    spec = _spec("api", "bandit", seeds=1)
    handlers = {s: signals.getsignal(s) for s in (signals.SIGINT, signals.SIGTERM)}
    folders = run_experiment(
        spec, tmp_path, progress=False, launcher=RayLauncher(address=cluster.address)
    )
    assert all((f / "done").exists() for f in folders) and len(folders) == 2
    assert {s: signals.getsignal(s) for s in handlers} == handlers  # Ray's handler not left


def test_resources_that_no_node_has_are_refused(cluster, tmp_path):
    spec = _spec("gpu", "bandit", resources={"GPU": 1})
    done = _experiment(spec, tmp_path / "runs", cluster, "--no-progress")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith(
        "erc-gym experiment: error: a run needs {'CPU': 1, 'GPU': 1} but no node of the Ray "
        "cluster has that much"
    )
    assert not list((tmp_path / "runs" / "gpu").glob("*/*"))


def test_an_address_where_no_cluster_answers_is_one_line(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "erc_gym", "experiment", "quick", "--runs", str(tmp_path)]
    cmd += ["--launcher", "ray", "--address", f"127.0.0.1:{port}", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"erc-gym experiment: error: cannot connect to the Ray cluster at 127.0.0.1:{port}: "
        "Connection refused; start its head with `ray start --head` (docs/cluster.md)"
    ]
