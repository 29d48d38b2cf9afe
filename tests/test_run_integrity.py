"""Nothing lost, nothing silently wrong in a runs folder: full disks, read-only folders, damaged
logs, interrupted runs and grids far larger than meant."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from test_runner_safety import TINY  # the smallest bandit grid: 2 runs of 3 iterations

from erc_gym.atomic import atomic_write, merge_json
from erc_gym.cli import main
from erc_gym.lab import runner
from erc_gym.lab.analysis import load_runs
from erc_gym.lab.report import write_report
from erc_gym.lab.rundir import done_problem, mark_done, read_done
from erc_gym.lab.runner import RunsFailed, run_experiment


def _one_error_line(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ full disk, read-only folder


def test_atomic_write_on_a_read_only_folder_names_the_file_not_its_temporary(tmp_path, monkeypatch):
    """On a read-only file system the temporary file cannot be created, nor removed: the
    removal's error hid the write's, and named the temporary file."""
    import builtins

    target = tmp_path / "experiment.json"
    real_open, real_unlink = builtins.open, Path.unlink

    def refuse(path, *args, **kwargs):
        if ".tmp" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    def refuse_unlink(self, missing_ok=False):
        if ".tmp" in self.name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(Path, "unlink", refuse_unlink)
    with pytest.raises(OSError) as exc:
        atomic_write(target, "{}")
    assert exc.value.errno == errno.EROFS and exc.value.filename == str(target)


@pytest.mark.parametrize("command", ["experiment", "report", "plot"])
def test_a_read_only_runs_folder_is_one_line(command, read_only, tmp_path, capsys):
    run_experiment(TINY, tmp_path / "runs", workers=1, progress=False)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    folder = read_only(tmp_path / "runs")
    argv = {
        "experiment": ["experiment", str(config), "--runs", str(folder), "--no-progress"],
        "report": ["report", str(folder)],
        "plot": ["plot", str(folder)],
    }[command]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    line = _one_error_line(capsys, f"erc-gym {command}")
    assert exc.value.code == 1
    assert str(folder) in line and "Read-only file system" in line, line


def test_an_experiment_whose_error_log_cannot_be_written_shows_the_error(tmp_path, monkeypatch):
    """On a full disk a run fails, and so does the write of its error.log: the summary said
    'traceback in its error.log' about a file that was never written."""
    import erc_gym.bandit
    import erc_gym.lab.rundir as rundir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/checkpoint.pt")

    real_write = rundir.atomic_write

    def no_log(path, data, **kwargs):
        if Path(path).name == "error.log":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data, **kwargs)

    monkeypatch.setattr(erc_gym.bandit, "train_bandit", full)
    monkeypatch.setattr(rundir, "atomic_write", no_log)
    with pytest.raises(RunsFailed) as exc:  # also with workers=1: no traceback escapes
        run_experiment(TINY, tmp_path, workers=1, progress=False)
    message = str(exc.value)
    assert "No space left on device: '/full/checkpoint.pt'" in message
    assert "error.log could not be written: No space left on device" in message
    assert "raised at" in message and "traceback in" not in message
    assert not list(tmp_path.glob("tiny/*/*/error.log"))


def test_a_failed_run_with_workers_1_is_reported_as_with_workers(tmp_path, monkeypatch, capsys):
    import erc_gym.bandit

    def broken(*args, **kwargs):
        raise ValueError("the verifier raised")

    monkeypatch.setattr(erc_gym.bandit, "train_bandit", broken)
    with pytest.raises(RunsFailed, match=r"2 of 2 runs failed.*ValueError: the verifier raised"):
        run_experiment(TINY, tmp_path, workers=1, progress=False)
    logs = sorted(tmp_path.glob("tiny/*/*/error.log"))
    assert len(logs) == 2 and "Traceback" in logs[0].read_text()
    assert f"traceback in {logs[0]}" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints(tmpfs, tmp_path, capsys):
    """Acceptance: a 2 MB tmpfs as the runs folder, filled up. Every command ends in one line
    naming a path on it, and the checkpoints already written are intact."""
    folder = tmpfs("2m")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    main(["experiment", str(config), "--runs", str(folder), "--no-progress", "--no-report"])
    capsys.readouterr()
    saved = {p: p.read_bytes() for p in folder.glob("tiny/*/*/checkpoint.pt")}
    assert len(saved) == 2
    with open(folder / ".filler", "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(folder).free - 4096))
    more = tmp_path / "more.json"  # a second seed: its runs must write checkpoints
    more.write_text(json.dumps({**TINY, "seeds": 2}))
    for prog, argv in [
        ("experiment", ["experiment", str(more), "--runs", str(folder), "--no-progress"]),
        ("report", ["report", str(folder)]),
        ("plot", ["plot", str(folder)]),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 1
        line = _one_error_line(capsys, f"erc-gym {prog}")
        assert str(folder) in line and "No space left on device" in line, line
    assert {p: p.read_bytes() for p in saved} == saved


# ------------------------------------------------------------------ run-folder integrity


@pytest.fixture
def three_done(tmp_path):
    spec = {**TINY, "seeds": 3, "erc": [None], "settings": {**TINY["settings"], "iterations": 4}}
    run_experiment(spec, tmp_path, workers=1, progress=False)
    return tmp_path / "tiny", [tmp_path / "tiny" / "V64-ppo" / str(s) for s in range(3)]


def test_the_done_marker_records_the_metrics_it_finished_with(three_done):
    _, folders = three_done
    marker = read_done(folders[0])
    data = (folders[0] / "metrics.jsonl").read_bytes()
    assert marker is not None and marker.metrics_lines == data.count(b"\n") == 5
    import hashlib

    assert marker.metrics_sha256 == hashlib.sha256(data).hexdigest()
    assert done_problem(folders[0]) is None


def test_a_report_names_damaged_runs_unreadable_folders_and_lines(three_done):
    """A done run whose log was cut short still counted, an emptied one showed 3/3, a garbage
    middle line was skipped silently and a folder whose config.json is not JSON was dropped."""
    experiment, folders = three_done
    log = folders[0] / "metrics.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))  # cut short
    (folders[1] / "metrics.jsonl").write_text("")  # emptied
    extra = experiment / "V64-ppo" / "3"  # a run folder whose config.json is damaged
    extra.mkdir()
    (extra / "config.json").write_text("{not json")
    (extra / "metrics.jsonl").write_text("{}\n")
    runs = load_runs(experiment)
    assert [r.done for r in runs] == [False, False, True]
    assert "has 2 lines, 5 when the run finished" in (runs[0].damaged or "")
    assert "has 0 lines, 5 when the run finished" in (runs[1].damaged or "")

    lines = (folders[2] / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "{garbage\n"  # a damaged middle line: the run no longer counts either
    (folders[2] / "metrics.jsonl").write_text("".join(lines))
    report = write_report(experiment, plots=False).read_text()
    page = (experiment / "report.html").read_text()
    for text in (report, page):
        assert "3 runs marked done are not counted" in text
        assert "V64-ppo/0: metrics.jsonl has 2 lines" in text
        assert "V64-ppo/2: metrics.jsonl differs from the file the run finished with" in text
        assert "V64-ppo/2: line 3" in text
        assert "V64-ppo/3: its config.json cannot be read" in text
    assert "| V64-ppo | 0/3 |" in report and "damaged, not counted: seed 0, 1, 2" in report


def test_an_older_done_marker_is_accepted_and_the_report_says_so(three_done):
    experiment, folders = three_done
    for folder in folders:
        (folder / "done").write_text("1.8\n")  # the marker before it recorded a checksum
    runs = load_runs(experiment)
    assert all(r.done and r.train_seconds() == 1.8 for r in runs)
    report = write_report(experiment, plots=False).read_text()
    assert "| V64-ppo | 3/3 |" in report
    assert "3 finished runs have a done marker written before markers recorded a checksum" in (
        report
    )


# ------------------------------------------------------------------ interrupted runs


def test_interrupted_bandit_runs_are_reported_as_partial(tmp_path, monkeypatch):
    """The bandit trainer rewrote config.json without the runner's variant and kind, so runs
    stopped before their end vanished, and 0 finished + 2 partial runs were 'no runs'."""
    monkeypatch.setenv("ERC_GYM_STOP_AFTER", "1")
    with pytest.raises(RunsFailed, match="stopped after 1"):
        run_experiment(TINY, tmp_path, workers=1, progress=False)
    config = json.loads((tmp_path / "tiny" / "V64-ppo" / "0" / "config.json").read_text())
    assert config["variant"] == "V64-ppo" and config["kind"] == "bandit"
    assert config["iterations"] == 3  # the trainer's own settings beside them
    report = write_report(tmp_path / "tiny", plots=False).read_text()
    assert "2 of 2 runs are unfinished" in report
    assert "| V64-ppo | 0/1 |" in report and "| V64-ppo-erc0.95-1.05 | 0/1 |" in report


def test_merge_json_keeps_the_keys_others_recorded(tmp_path):
    path = tmp_path / "config.json"
    merge_json(path, {"variant": "V-ppo", "seed": 0})
    merge_json(path, {"seed": 1, "lr": 0.1})
    assert json.loads(path.read_text()) == {"variant": "V-ppo", "seed": 1, "lr": 0.1}
    path.write_text("[1, 2]")  # not an object: counts as empty
    merge_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}


# ------------------------------------------------------------------ grids far larger than meant


def test_a_large_grid_is_announced_before_it_starts(tmp_path, monkeypatch, capsys):
    seen = []

    def launcher(todo, root, resume, overwrite, progress):
        seen.append(len(todo))
        return runner.Outcome()

    monkeypatch.setattr(runner, "LARGE_GRID", 10)
    run_experiment({**TINY, "seeds": 6}, tmp_path, launcher=launcher, progress=False)
    err = capsys.readouterr().err
    assert seen == [12]
    assert "warning: tiny: a large grid of 12 runs (2 variants x 6 seeds)" in err
    assert "the progress bar estimates the time once the first runs finish" in err
    run_experiment({**TINY, "seeds": 3}, tmp_path, launcher=launcher, progress=False)
    assert "warning" not in capsys.readouterr().err  # 6 runs: no warning


def test_a_large_grid_with_finished_runs_estimates_the_rest(tmp_path, monkeypatch, capsys):
    run_experiment(TINY, tmp_path, workers=1, progress=False)
    for folder in tmp_path.glob("tiny/*/0"):
        marker = json.loads((folder / "done").read_text())
        (folder / "done").write_text(json.dumps({**marker, "seconds": 36.0}))
    capsys.readouterr()
    monkeypatch.setattr(runner, "LARGE_GRID", 10)
    run_experiment(
        {**TINY, "seeds": 101},
        tmp_path,
        workers=2,
        launcher=lambda *args: runner.Outcome(),
        progress=False,
    )
    err = capsys.readouterr().err
    # a sample of every 4th run: 1 of 51 has finished; ~198 to go at 36 s on 2 workers: 1.0 h
    assert "1 of 51 runs sampled have finished, in a median 36 s: about 1.0 h" in err, err
    assert "for the other ~198 on 2 workers" in err


def test_plot_and_report_leave_out_damaged_values(three_done, capsys):
    """A line whose values are of the wrong type (a step that is an object, a histogram of
    another length, a negative entropy) ended plot and report in a TypeError or ValueError."""
    from erc_gym.lab.plots import plot_experiment

    experiment, folders = three_done
    log = folders[0] / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows[1]["step"] = {"a": 1}
    rows[2]["entropy_ratio_hist"] = [1, 2, "x"]
    rows[3]["entropy_ratio_hist"] = [[1], 2]
    rows[4]["entropy"] = -1.0
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mark_done(folders[0], 1.0)  # as if the trainer had logged these: the run counts
    (run,) = [r for r in load_runs(experiment) if r.path == folders[0]]
    assert run.done
    steps, _ = run.series("score")
    assert len(steps) == len(rows) - 1  # the line with the damaged step is left out
    hist_steps, hists = run.histograms()
    assert hists.ndim == 2 and len(hist_steps) == len(hists)
    assert plot_experiment(experiment)
    main(["report", str(experiment)])
    assert "Traceback" not in capsys.readouterr().err


def test_damaged_audit_lines_and_an_unknown_kind_are_left_out(three_done, capsys):
    """Values of the wrong type in clipping.jsonl (a band that is a number, an infinite state
    count, bins of lists) ended the report in TypeError / OverflowError / KeyError, and a
    config.json with ``"kind": null`` ended plot in a ValueError."""
    from erc_gym.lab.clipping import profile, run_profile

    experiment, folders = three_done
    audit = folders[0] / "clipping.jsonl"
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    good = profile(lines)
    assert good is not None and good.updates == len(lines) == 4
    lines[0]["band"] = 0.5
    lines[1]["states"] = float("inf")
    group = next(k for k, v in lines[2].items() if isinstance(v, dict) and "n" in v)
    lines[2][group]["n"] = [[1, 2]]
    audit.write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = json.loads((folders[1] / "config.json").read_text())
    (folders[1] / "config.json").write_text(json.dumps({**config, "kind": None}))
    (run,) = [r for r in load_runs(experiment) if r.path == folders[0]]
    damaged = run_profile(run)
    assert damaged is not None and damaged.updates == 1 and damaged.band == good.band
    main(["report", str(experiment)])
    assert "Traceback" not in capsys.readouterr().err
    text = (experiment / "report.md").read_text()
    assert "V64-ppo/1: its config.json names no variant and known kind" in text
