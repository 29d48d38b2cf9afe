"""The runner off the happy path: signals, concurrent runs, changed configs, bad
configs, partial runs in reports, strict JSON, progress within runs, installs.

Signals and concurrency use real ``erc-gym experiment`` subprocesses on tiny grids.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erc_gym.cli import main
from erc_gym.lab.analysis import find_experiments, load_runs, summarize
from erc_gym.lab.config import ConfigError, load_experiment, validate_experiment
from erc_gym.lab.grid import expand
from erc_gym.lab.rundir import ConfigMismatch, RunLocked
from erc_gym.lab.runner import run_experiment, run_one

TINY = {
    "name": "tiny",
    "kind": "bandit",
    "seeds": 1,
    "algorithms": ["ppo"],
    "erc": [None, [0.95, 1.05]],
    "envs": [{"label": "V64", "vocab_size": 64, "num_contexts": 4}],
    "settings": {"iterations": 3, "group": 4, "minibatches": 2},
}
#: Long enough runs (several seconds each even on an idle machine) for a signal to land while
#: both are in flight.
SLOW = {
    **TINY,
    "name": "slow",
    "envs": [{"label": "V256", "vocab_size": 256, "num_contexts": 4}],
    "settings": {"iterations": 300, "group": 8, "minibatches": 4, "save_every": 5},
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Runs trained in this process (``workers=1``) use one thread, as worker processes do."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cli(config: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "erc_gym", "experiment", str(config), "--runs", str(runs), *extra]


def _start(tmp_path: Path, spec: dict, *extra: str) -> tuple[subprocess.Popen, Path]:
    config = tmp_path / f"{spec['name']}.json"
    config.write_text(json.dumps(spec))
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        _cli(config, runs, "--no-report", *extra),
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # two cores shared by many: no spinning
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job is
    )
    return proc, runs / spec["name"]


def _wait_for_lines(folder: Path, runs: int, lines: int, proc: subprocess.Popen) -> None:
    """Until ``runs`` metrics files below ``folder`` have ``lines`` lines (or fail)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        files = list(folder.glob("*/*/metrics.jsonl"))
        if len(files) >= runs and all(len(f.read_text().splitlines()) >= lines for f in files):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("runs did not start")


def _children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")


@pytest.mark.slow  # real signals to real processes: seconds of waiting each
@needs_proc
def test_ctrl_c_stops_workers_says_how_to_resume_and_resumes(tmp_path, capsys):
    proc, folder = _start(tmp_path, SLOW, "--workers", "2")
    _wait_for_lines(folder, runs=2, lines=40, proc=proc)  # >= 0.1 of each run: the bar shows it
    time.sleep(0.6)  # one more progress refresh
    workers = _children(proc.pid)
    assert len(workers) == 2
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 8
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGINT: 0/2 runs finished, 2 stopped at their last checkpoint" in last
    assert "resume with: erc-gym experiment" in last and "Traceback" not in err
    assert not _wait_gone(workers)
    # the bar moved within runs, before any run finished (item 13)
    assert re.search(r"\b0\.\d*[1-9]\d*/2 runs", err), err[-300:]
    # the same call resumes from the checkpoints and completes every run exactly once
    run_experiment(SLOW, tmp_path / "runs", workers=1, progress=False)
    for run in load_runs(folder):
        assert run.done
        assert [r["iteration"] for r in run.rows] == list(range(301))


@pytest.mark.slow  # real signals to real processes: seconds of waiting each
@needs_proc
def test_sigterm_then_second_signal_exits_at_once(tmp_path):
    proc, folder = _start(tmp_path, SLOW, "--workers", "2")
    _wait_for_lines(folder, runs=2, lines=2, proc=proc)
    workers = _children(proc.pid)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)  # a second signal must not wait (or hang)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1]
    assert not _wait_gone(workers)


@pytest.mark.slow  # real signals to real processes: seconds of waiting each
@needs_proc
def test_workers_die_with_a_sigkilled_main_process(tmp_path):
    proc, folder = _start(tmp_path, SLOW, "--workers", "2")
    _wait_for_lines(folder, runs=2, lines=2, proc=proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not _wait_gone(workers), "workers outlived the main process"


@needs_proc
def test_two_invocations_on_one_runs_folder_never_interleave(tmp_path, capsys):
    spec = {**SLOW, "settings": {**SLOW["settings"], "iterations": 150}}
    first, folder = _start(tmp_path, spec, "--workers", "1", "--no-progress")
    _wait_for_lines(folder, runs=1, lines=2, proc=first)
    # a second writer on the same folder while the first trains run 0 (in this process)
    run_experiment(spec, tmp_path / "runs", workers=1, progress=False)
    second = capsys.readouterr().err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "is being trained by another erc-gym process" in second + err
    assert "run(s) skipped: another erc-gym process holds them" in second
    for run in load_runs(folder):
        assert run.done
        assert [r["iteration"] for r in run.rows] == list(range(151))  # no duplicated lines


def test_a_held_run_folder_is_refused(tmp_path):
    from filelock import FileLock

    (run,) = expand({**TINY, "erc": [None]})
    folder = run.folder(tmp_path)
    folder.mkdir(parents=True)
    with FileLock(folder / ".lock"), pytest.raises(RunLocked, match="another erc-gym process"):
        run_one(run, tmp_path)
    assert not (folder / "metrics.jsonl").exists()


def test_changed_config_is_refused_naming_keys_and_overwrite_starts_over(tmp_path, capsys):
    run_experiment(TINY, tmp_path, workers=1, progress=False)
    changed = {**TINY, "settings": {**TINY["settings"], "iterations": 5, "lr": 0.1}}
    with pytest.raises(ConfigMismatch, match=r"iterations: 3 -> 5; lr: 0\.05 -> 0\.1"):
        run_experiment(changed, tmp_path, workers=1, progress=False)
    config = tmp_path / "changed.json"
    config.write_text(json.dumps(changed))
    with pytest.raises(SystemExit) as exc:
        main(["experiment", str(config), "--runs", str(tmp_path), "--workers", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "iterations: 3 -> 5" in err
    folders = run_experiment(changed, tmp_path, workers=1, progress=False, overwrite=True)
    for folder in folders:
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == list(range(6))
        assert json.loads((folder / "run.json").read_text())["trainer"]["iterations"] == 5


def test_removed_variants_and_seeds_leave_the_report(tmp_path):
    from erc_gym.lab.report import write_report

    run_experiment({**TINY, "seeds": 2}, tmp_path, workers=1, progress=False)
    run_experiment({**TINY, "erc": [[0.95, 1.05]]}, tmp_path, workers=1, progress=False)
    runs = load_runs(tmp_path / "tiny")
    assert [(r.variant, r.seed) for r in runs] == [("V64-ppo-erc0.95-1.05", 0)]
    text = write_report(tmp_path / "tiny", plots=False).read_text()
    assert "| V64-ppo | " not in text and "| V64-ppo-erc0.95-1.05 | 1/1 |" in text
    assert "3 run folders are not in the current config" in text


def test_duplicate_env_labels_are_rejected_up_front(tmp_path):
    envs = [{"label": "V", "vocab_size": 32}, {"label": "V", "vocab_size": 64}]
    with pytest.raises(ConfigError, match="duplicate V"):
        run_experiment({**TINY, "envs": envs}, tmp_path, workers=1, progress=False)
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"setings": {}}, "setings = {}: unknown key (did you mean 'settings'?)"),
        ({"seeds": "12"}, "seeds = '12': Input should be a valid integer"),
        ({"seeds": 2.0}, "seeds = 2.0: Input should be a valid integer"),
        ({"seeds": 0}, "seeds = 0: Input should be greater than or equal to 1"),
        ({"seeds": -1}, "seeds = -1: Input should be greater than or equal to 1"),
        ({"algorithms": "ppo"}, "algorithms = 'ppo': Input should be a valid list"),
        ({"erc": [[1.05, 0.95]]}, "erc[0] = [1.05, 0.95]: an ERC band is [low, high]"),
        ({"settings": {"iterations": 0}}, "iterations must be >= 1, got iterations=0"),
        ({"settings": {"iterations": -3}}, "iterations must be >= 1, got iterations=-3"),
        ({"settings": {"iterations": "4"}}, "iterations = '4': Input should be a valid integer"),
        ({"settings": {"itrations": 4}}, "itrations = 4: unknown key (did you mean 'iterations'?)"),
        # h14: a count that would expand millions of runs, and seeds the trainers' RNGs refuse
        ({"seeds": 10**30}, f"seeds = {10**30}: Input should be less than or equal to 1000"),
        ({"seeds": 100_000_000}, "seeds = 100000000: Input should be less than or equal to 1000"),
        ({"seeds": [2**32]}, "seeds[0] = 4294967296: Input should be less than or equal to 21474"),
        # h14: checked when the config is read, not when every run fails
        ({"settings": {"lr": math.inf}}, "lr must be a finite number > 0, got lr=inf"),
        ({"envs": [{"vocab_size": 10**9}]}, "vocab_size must be in [2, 151936], got vocab_size=1"),
        ({"envs": [{"reward_set_size": 64, "vocab_size": 64}]}, "reward_set_size must be in"),
    ],
)
def test_bad_configs_fail_in_one_line_before_any_run(tmp_path, capsys, change, message):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**TINY, **change}))
    with pytest.raises(SystemExit) as exc:
        main(["experiment", str(config), "--runs", str(tmp_path / "runs"), "--workers", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_config_file_with_a_key_twice_is_refused(tmp_path, capsys):
    """``json`` keeps the last of two equal keys, so a copied-and-edited line silently won."""
    config = tmp_path / "dup.json"
    text = json.dumps(TINY).replace('"iterations": 3', '"iterations": 3, "iterations": 30')
    config.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["experiment", str(config), "--runs", str(tmp_path / "runs"), "--workers", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"erc-gym experiment: error: {config}: key 'iterations' appears twice in one object "
        "(3 and 30); keep one"
    )
    assert not (tmp_path / "runs").exists()


def test_sb3_configs_are_checked_too():
    sb3 = {
        **TINY,
        "kind": "sb3",
        "envs": [{"label": "CartPole", "id": "CartPole-v1"}],
        "settings": {"steps": 1024},
    }
    assert validate_experiment(sb3)["envs"][0]["id"] == "CartPole-v1"
    with pytest.raises(ConfigError, match="steps = 0: Input should be greater than 0"):
        validate_experiment({**sb3, "settings": {"steps": 0}})
    with pytest.raises(ConfigError, match=r"n_stepz = 3: unknown key .*'n_steps'"):
        validate_experiment({**sb3, "settings": {"n_stepz": 3}})
    with pytest.raises(ConfigError, match="id = 'Pong-v5': no preset"):
        validate_experiment({**sb3, "envs": [{"id": "Pong-v5"}]})


def test_unfinished_runs_stay_out_of_the_final_score(tmp_path):
    from erc_gym.lab.report import write_report

    folders = run_experiment(
        {**TINY, "seeds": 3, "erc": [None]}, tmp_path, workers=1, progress=False
    )
    # seed 2 has not finished: its score (here made far higher) must not enter the IQM
    (folders[2] / "done").unlink()
    metrics = folders[2] / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    rows[-1]["expected_reward"] = 100.0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = load_runs(tmp_path / "tiny")
    (row,) = summarize(runs)
    finals = [r.final_score() for r in runs[:2]]
    assert row["runs"] == "2/3" and row["unfinished"] == [2]
    assert row["iqm"] == pytest.approx(sum(finals) / 2) and row["iqm"] < 1.0
    text = write_report(tmp_path / "tiny", plots=False).read_text()
    assert "1 of 3 runs are unfinished and left out" in text and "(unfinished: seed 2)" in text
    shutil.rmtree(folders[1])  # a run never started: still counted in the declared total
    assert "| V64-ppo | 1/3 |" in write_report(tmp_path / "tiny", plots=False).read_text()


def test_report_skips_a_lone_llm_run_folder(tmp_path, capsys):
    run_experiment(TINY, tmp_path / "runs", workers=1, progress=False)
    lone = tmp_path / "runs" / "mine" / "llm"  # what `erc-gym llm --run-dir runs/mine` writes
    lone.mkdir(parents=True)
    (lone / "config.json").write_text(json.dumps({"model": "tiny", "loss": "grpo", "steps": 2}))
    (lone / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_accuracy": 0.1}) + "\n")
    found, notes = find_experiments(tmp_path / "runs")
    assert found == [tmp_path / "runs" / "tiny"] and "single training run" in notes[0]
    main(["report", str(tmp_path / "runs"), "--no-plots"])
    out = capsys.readouterr()
    assert "tiny/report.md" in out.out and "skipped" in out.err


def test_sb3_metrics_are_strict_json(tmp_path):
    from stable_baselines3.common.logger import Logger

    from erc_gym.sb3.jsonlog import StrictJSONOutputFormat

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n')  # appends (a resumed run keeps its log)
    logger = Logger(str(tmp_path), [StrictJSONOutputFormat(path)])
    logger.record("train/erc_clip_fraction", math.nan)
    logger.record("train/loss", 0.5)
    logger.dump(8)

    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))

    rows = [strict(x) for x in path.read_text().splitlines()]
    assert rows == [{"a": 1}, {"train/erc_clip_fraction": None, "train/loss": 0.5}]


def test_shipped_configs_are_package_data():
    assert load_experiment("quick")["name"] == "quick"
    import erc_gym.lab
    from erc_gym.lab.config import CONFIG_DIR

    assert CONFIG_DIR.parent == Path(erc_gym.lab.__file__).parent
    root = Path(__file__).resolve().parents[1]
    assert (root / "experiments" / "configs" / "quick.json").is_file()  # the old path still works


PIP = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]


def test_wheel_ships_the_configs(tmp_path):
    """``pip install`` (not editable): ``erc-gym experiment --list`` and a config load work."""
    root = tmp_path / "src"  # a copy: building in place would write build/ into the checkout
    shutil.copytree(
        Path(__file__).resolve().parents[1],
        root,
        ignore=shutil.ignore_patterns(".*", "runs", "build", "dist", "*.egg-info", "__pycache__"),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(root)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("erc_gym-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [*PIP, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import erc_gym, sys; from erc_gym.cli import main; "
        f"assert erc_gym.__file__.startswith({str(target)!r}), erc_gym.__file__; "
        "main(['experiment', '--list'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "quick" in out.stdout and "band_sweep" in out.stdout


def _capture_figures(monkeypatch) -> list:
    import erc_gym.lab.plots as plots

    figures = []

    def save(fig, path):
        figures.append(fig)
        return [path.with_suffix(".png")]

    monkeypatch.setattr(plots, "save_figure", save)
    monkeypatch.setattr(plots.pyplot(), "close", lambda fig: None)
    return figures


def test_figures_keep_grid_order_and_tell_coinciding_algorithms_apart(tmp_path, monkeypatch):
    from erc_gym.lab.plots import plot_experiment

    bands = [None, [0.9, 1.1], [0.8, 1.2]]  # grid order is not alphabetical (0.8 < 0.9)
    spec = {**TINY, "algorithms": ["ppo", "dapo"], "erc": bands}
    run_experiment(spec, tmp_path, workers=1, progress=False)
    figures = _capture_figures(monkeypatch)
    plot_experiment(tmp_path / "tiny")
    curves, heatmaps = figures
    grid = [r.variant for r in expand(spec)]
    titles = [ax.get_title() for ax in heatmaps.axes if ax.get_title()]
    assert titles == list(dict.fromkeys(grid))
    lines = {line.get_label().split(" ")[0]: line for line in curves.axes[0].get_lines()}
    ppo, dapo = lines["V64-ppo-erc0.9-1.1"], lines["V64-dapo-erc0.9-1.1"]
    assert ppo.get_color() == dapo.get_color()  # colour = band
    assert (ppo.get_linestyle(), ppo.get_marker()) != (dapo.get_linestyle(), dapo.get_marker())
    assert lines["V64-ppo"].get_color() != ppo.get_color()
    # the title's line-style key names the algorithms of this grid, and only those
    assert "(solid PPO, dashed+o DAPO)" in curves._suptitle.get_text()


def test_long_noisy_series_are_smoothed_and_spikes_do_not_flatten_panels(tmp_path, monkeypatch):
    import numpy as np

    from erc_gym.lab.plots import plot_experiment, smooth

    rng = np.random.default_rng(0)
    x = np.arange(400.0)
    noisy = 1.0 + rng.normal(0, 0.5, 400)
    xs, ys, k = smooth(x, noisy)
    assert k > 1 and ys.std() < noisy.std() / 2 and xs[-1] == 399
    assert smooth(x[:40], noisy[:40])[2] == 1  # short series (bandit, 40 updates) unchanged
    spec = {**TINY, "kind": "llm", "algorithms": ["dapo"], "erc": [None]}
    spec["envs"] = [{"label": "add1", "model": "tiny"}]
    folder = tmp_path / "lm" / "add1-dapo" / "0"
    folder.mkdir(parents=True)
    (tmp_path / "lm" / "experiment.json").write_text(json.dumps({**spec, "name": "lm"}))
    config = {"kind": "llm", "variant": "add1-dapo", "seed": 0, "algorithm": "dapo", "erc": None}
    (folder / "config.json").write_text(json.dumps(config))
    grad = np.abs(noisy)
    grad[200] = 500.0  # one spike
    rows = [{"step": int(i), "grad_norm": float(g), "entropy": 1.0} for i, g in enumerate(grad)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "done").write_text("1\n")
    figures = _capture_figures(monkeypatch)
    plot_experiment(tmp_path / "lm")
    grad_ax = next(ax for ax in figures[0].axes if "gradient" in ax.get_ylabel())
    assert grad_ax.get_ylim()[1] < 50  # the spike (smoothed: ~500/k) is off-scale, not the axis
    assert "moving average" in figures[0]._suptitle.get_text()
    assert "(dashed+o DAPO)" in figures[0]._suptitle.get_text()  # no PPO or GPPO in the key


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_resume(tmp_path, monkeypatch):
    spec = {**TINY, "erc": [None], "settings": {**TINY["settings"], "save_every": 1}}
    monkeypatch.setenv("ERC_GYM_STOP_AFTER", "2")
    with pytest.raises(RuntimeError, match="stopped after 2"):
        run_experiment(spec, tmp_path, workers=1, progress=False)
    monkeypatch.delenv("ERC_GYM_STOP_AFTER")
    metrics = tmp_path / "tiny" / "V64-ppo" / "0" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 48, "iteration": 3, "expected_rew')  # killed mid-write
    (folder,) = run_experiment(spec, tmp_path, workers=1, progress=False)
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]


def test_an_interrupted_llm_grid_run_is_reported_and_resumes(tmp_path, monkeypatch):
    """The LLM trainer rewrites config.json at start: it must keep the runner's record (variant,
    kind), or a run stopped before its end is invisible to `erc-gym report` and its resume is
    refused as "other settings" (both seen on the GPU map, whose runs were stopped at a budget)."""

    spec = {
        "name": "lm",
        "kind": "llm",
        "seeds": 1,
        "algorithms": ["dapo"],
        "erc": [None],
        "envs": [{"label": "add1", "model": "tiny"}],
        "settings": {"sft_steps": 2, "steps": 4, "eval_every": 2, "save_every": 1,
                     "prompts_per_step": 4, "group_size": 4},
    }  # fmt: skip
    monkeypatch.setenv("ERC_GYM_STOP_AFTER", "2")
    with pytest.raises(RuntimeError, match="stopped after 2"):
        run_experiment(spec, tmp_path, workers=1, progress=False)
    (run,) = load_runs(tmp_path / "lm")
    assert run.variant == "add1-dapo" and not run.done and run.rows
    monkeypatch.delenv("ERC_GYM_STOP_AFTER")
    (folder,) = run_experiment(spec, tmp_path, workers=1, progress=False)
    (run,) = load_runs(tmp_path / "lm")
    assert run.done and (folder / "done").exists()
    steps = [r["step"] for r in run.rows if "accuracy" in r]
    assert steps == [1, 2, 3, 4]


def test_a_signal_after_the_runs_were_stopped_does_not_change_the_exit(monkeypatch, capsys):
    """A second Ctrl-C that lands after the runner gave its handlers back (while the CLI prints
    "stopped by SIGTERM" and exits) was a KeyboardInterrupt: exit 130, or death by SIGINT (-2)
    in CI. Deterministic version: the runner's stand-in sends SIGINT to this process at exactly
    that moment."""
    import erc_gym.lab.runner as runner_module
    from erc_gym.cli import main

    def stopped_by_sigterm(*args, **kwargs):
        runner_module._note_stop(signal.SIGTERM)  # what the runner's handler records
        os.kill(os.getpid(), signal.SIGINT)  # arrives after the runner's handlers are gone
        raise runner_module.ExperimentInterrupted(signal.SIGTERM, 0, 2, [])

    monkeypatch.setattr(runner_module, "run_experiment", stopped_by_sigterm)
    monkeypatch.setattr(runner_module, "_stopped_by", None)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["experiment", "quick", "--runs", "unused", "--no-progress"])
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert exit_info.value.code == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err


def test_workers_1_trains_on_one_torch_thread_like_a_worker(tmp_path, monkeypatch):
    """`--workers 1` runs in this process; it used torch's default thread count there (~8x the
    CPU of a worker's single thread for CartPole on a busy machine), so a run's speed and
    numbers depended on --workers."""
    import torch

    import erc_gym.lab.runner as runner_module

    seen = []
    real = runner_module.run_one
    monkeypatch.setattr(
        runner_module,
        "run_one",
        lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1],
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_experiment({**TINY, "erc": [None]}, tmp_path, workers=1, progress=False)
        assert seen == [1]
        assert torch.get_num_threads() == 2  # given back afterwards
    finally:
        torch.set_num_threads(before)


def test_a_failed_figure_save_keeps_the_previous_figure(tmp_path):
    """Figures are written to a temporary name and renamed: a save that fails half-way leaves
    the previous PNG/SVG whole and no temporary file behind."""
    from erc_gym.lab.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png, svg = save_figure(fig, tmp_path / "curves")
    before = png.read_bytes(), svg.read_bytes()

    def broken(target, **kwargs):
        Path(target).write_bytes(b"\x89PNG half")  # a partial file, then the failure
        raise OSError("disk full")

    fig.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path / "curves")
    plt.close(fig)
    assert (png.read_bytes(), svg.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "curves.svg"]
