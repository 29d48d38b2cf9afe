"""The erc-gym command line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erc_gym import demo
from erc_gym.cli import COMMANDS, main
from erc_gym.losses import ERCConfig, LossConfig


def test_top_level_help():
    out = subprocess.run(
        [sys.executable, "-m", "erc_gym", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("train", "--erc-low"),
        ("llm", "--erc-low"),
        ("experiment", "Shipped experiments"),
        ("plot", "runs_dir"),
        ("report", "runs_dir"),
        ("demo", "--vocab"),
    ],
)
def test_every_command_has_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert expected in capsys.readouterr().out


def test_experiment_plot_and_report_commands(tmp_path, capsys):
    config = tmp_path / "mini.json"
    config.write_text(
        json.dumps(
            {
                "name": "mini",
                "kind": "bandit",
                "seeds": 2,
                "algorithms": ["ppo"],
                "erc": [None, [0.9, 1.1]],
                "envs": [{"label": "V32", "vocab_size": 32, "num_contexts": 4}],
                "settings": {"iterations": 3, "group": 4, "minibatches": 2},
            }
        )
    )
    runs = tmp_path / "runs"
    main(["experiment", str(config), "--runs", str(runs), "--workers", "1"])
    assert (runs / "mini" / "report.md").exists()
    main(["plot", str(runs)])  # a runs folder: every experiment below it
    assert "V32_curves.png" in capsys.readouterr().out
    main(["report", str(runs / "mini"), "--no-plots"])
    assert "| V32-ppo-erc0.9-1.1 | 2/2 | " in (runs / "mini" / "report.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "runs" / "mini" / "V32-ppo")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"is inside the experiment folder {runs / 'mini'}; give that folder" in err


def test_train_command_logs_sb3_and_diagnostic_keys(tmp_path, capsys):
    log_dir = tmp_path / "log"
    main(
        [
            "train",
            "CartPole-v1",
            "--steps",
            "512",
            "--n-envs",
            "2",
            "--log-dir",
            str(log_dir),
            "--save",
            str(tmp_path / "model.zip"),
            "--no-progress",
        ]
    )
    rows = [json.loads(x) for x in (log_dir / "progress.json").read_text().splitlines()]
    assert len(rows) >= 4  # one row per update is still logged to the file
    assert any("train/erc_clip_fraction" in r for r in rows)
    assert any("diagnostics/entropy_volatility" in r for r in rows)
    assert (tmp_path / "model.zip").exists()
    # a short summary on stdout, not SB3's table after every update
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 6, out
    assert "CartPole-v1: ercppo (ERC on), 512 steps" in out
    assert "mean episode return over the last" in out
    assert "rollout/" not in out


def test_train_passes_ppo_options_and_evaluates(tmp_path, capsys):
    """--lr, --n-epochs, --batch-size, --target-kl and --ent-coef reach the algorithm."""
    from erc_gym.sb3 import ERCPPO

    model_path = tmp_path / "model.zip"
    main(
        [
            "train",
            "CartPole-v1",
            *("--steps", "256", "--n-envs", "2", "--no-progress"),
            *("--lr", "0.002", "--n-epochs", "3", "--batch-size", "32"),
            *("--target-kl", "0.02", "--ent-coef", "0.01", "--eval-episodes", "2"),
            *("--log-dir", str(tmp_path / "log"), "--save", str(model_path)),
        ]
    )
    model = ERCPPO.load(model_path)
    assert model.learning_rate == 0.002  # a constant, not the preset's lin_0.001 schedule
    assert model.n_epochs == 3
    assert model.batch_size == 32
    assert model.target_kl == 0.02
    assert model.ent_coef == 0.01
    out = capsys.readouterr().out
    assert re.search(r"evaluation: mean return [0-9.]+ \(std [0-9.]+\) over 2 deterministic", out)


def test_train_verbose_prints_sb3_tables(tmp_path, capsys):
    args = ["train", "CartPole-v1", "--steps", "256", "--n-envs", "2", "--no-progress"]
    main([*args, "--log-dir", str(tmp_path), "--verbose"])
    out = capsys.readouterr().out
    assert out.count("| rollout/") >= 2  # one table per update


def _file(tmp_path: Path) -> str:
    """A path below a regular file: no folder can be created there (even as root)."""
    (tmp_path / "file").write_text("")
    return str(tmp_path / "file")


#: Options that keep a run which wrongly starts short (a test that fails does so in seconds).
TINY = ["--steps", "64", "--n-envs", "1", "--no-progress", "--log-dir", "{tmp}/log"]

# Every bad value is one line on stderr and exit 2, never a traceback.
BAD_INPUTS = [
    (["nope"], "invalid choice: 'nope'"),
    (["train", "Nope-v0"], "unknown environment id 'Nope-v0'"),
    (["train", "CartPole-v1", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["train", "CartPole-v1", "--steps", "-5"], "--steps: must be >= 1, got -5"),
    (["train", "CartPole-v1", "--n-envs", "0"], "--n-envs: must be >= 1"),
    # found by the fuzz (tests/test_cli_fuzz.py): sizes that hung, names the OS refuses
    (["train", "CartPole-v1", "--n-envs", "2147483648"], "--n-envs: at most 1024"),
    (["llm", "--num-train", "2147483648"], "num_train must be <= 1000000"),
    (["llm", "--num-eval", "10000000"], "num_eval must be <= 1000000"),
    (["train", "CartPole-v1", "--save", "a" * 300], "--save " + "a" * 300 + ": File name too"),
    (["train", "CartPole-v1", "--log-dir", "a" * 300], ": File name too long"),
    (["report", "a" * 300], ": File name too long"),
    (["plot", "a" * 300], ": File name too long"),
    (["experiment", "a" * 300], ": File name too long"),
    ([], "give a command: train, llm"),
    (["train", "CartPole-v1", "--log-interval", "0"], "--log-interval: must be >= 1"),
    (["train", "CartPole-v1", "--algo", "trpo"], "invalid choice: 'trpo'"),
    (["train", "CartPole-v1", "--erc-low", "0.9"], "go together: got only --erc-low 0.9"),
    (["train", "CartPole-v1", "--erc-high", "1.1"], "go together: got only --erc-high 1.1"),
    (["train", "CartPole-v1", "--erc-low", "1.1", "--erc-high", "0.9"], "low must satisfy"),
    (["train", "CartPole-v1", "--erc-low", "x", "--erc-high", "1"], "--erc-low: expected a number"),
    (["train", "Pendulum-v1"], "discrete action space"),
    (["train", "CartPole-v1", "--save", "{file}/m.zip"], "is a file, not a folder"),
    (["train", "CartPole-v1", "--log-dir", "{file}/log"], "--log-dir"),
    (["llm", "--steps", "0"], "steps must be >= 1, got steps=0"),
    (["llm", "--eval-every", "0"], "eval_every must be >= 1, got eval_every=0"),
    (["llm", "--erc-low", "0.9"], "erc_low and erc_high must both be set"),
    (["llm", "--filter-groups", "ture"], "--filter-groups: expected true or false, got 'ture'"),
    (["llm", "--progress", "maybe"], "expected true or false"),
    (["llm", "--model", "Qwen/Qwen2.5-0.5B"], "nor a local folder"),
    (["llm", "--dataset", "{file}/x.jsonl"], "no such file"),
    (["llm", "--loss", "trpo"], "got loss='trpo'"),
    (["llm", "--lr", "abc"], "--lr: expected float or none, got 'abc'"),
    (["llm", "--lr", "0"], "lr must be a finite number > 0"),
    (["llm", "--device", "tpu"], "device='tpu'"),
    (["llm", "--preset", "nope"], "invalid choice: 'nope'"),
    (["llm", "--name", "a/b"], "plain folder name"),
    (["llm", "--run-dir", "{file}/runs"], "--run-dir"),
    (["llm", "--dataset", "{bad_jsonl}"], "bad.jsonl:2: not JSON"),
    (["plot", "{file}/missing"], "no folder"),
    (["plot", "{tmp}"], "no runs below"),
    (["report", "{file}/missing"], "no folder"),
    (["report", "{tmp}"], "no runs below"),
    (["demo", "--vocab", "1"], "--vocab: needs at least 2"),
    (["demo", "--batch", "0"], "--batch: must be >= 1"),
    (["demo", "--lr", "0"], "--lr: must be a finite number > 0"),
    (["demo", "--lr", "nan"], "--lr: must be a finite number > 0"),
    (["demo", "--steps", "two"], "--steps: expected a whole number"),
    (["experiment", "quick", "--workers", "0"], "--workers: must be >= 1"),
    (["experiment", "quick", "--seeds", "-1"], "--seeds: must be >= 1"),
    # h14: ERCPPO-only options were silently ignored by SB3's PPO / A2C
    (["train", "CartPole-v1", "--algo", "ppo", "--dual-clip", "3", *TINY], "--dual-clip 3.0 needs"),
    (["train", "CartPole-v1", "--algo", "a2c", "--clip-variant", "gppo", *TINY], "--clip-variant"),
    (["train", "CartPole-v1", "--algo", "ppo", "--clip-range-high", "0.3", *TINY], "--clip-range"),
    (["train", "CartPole-v1", "--save", "", *TINY], "--save '': give a file path"),
    # PPO options for the tutorial's collapse cell (16 steps per rollout, target_kl, entropy bonus)
    (["train", "CartPole-v1", "--algo", "a2c", "--target-kl", "0.02", *TINY], "--target-kl 0.02 n"),
    (["train", "CartPole-v1", "--algo", "a2c", "--n-epochs", "4", *TINY], "needs --algo ercppo or"),
    (["train", "CartPole-v1", "--target-kl", "0"], "--target-kl: must be a finite number > 0"),
    (["train", "CartPole-v1", "--target-kl", "nan"], "--target-kl: must be a finite number > 0"),
    (["train", "CartPole-v1", "--target-kl", "big"], "--target-kl: expected a number > 0"),
    (["train", "CartPole-v1", "--batch-size", "1"], "--batch-size: must be >= 2"),
    (["train", "CartPole-v1", "--n-epochs", "0"], "--n-epochs: must be >= 1"),
    (["train", "CartPole-v1", "--lr", "inf"], "--lr: must be a finite number > 0"),
    (["train", "CartPole-v1", "--ent-coef", "-0.1"], "--ent-coef: must be a finite number >= 0"),
    (["train", "CartPole-v1", "--eval-episodes", "-1"], "--eval-episodes: must be >= 0"),
    # h14: LLM settings that were accepted, or failed later with a traceback / without a name
    (["llm", "--seed", "-1"], "seed must be in [0, 2**32 - 1], got seed=-1"),
    (["llm", "--seed", "99999999999999999999"], "got seed=99999999999999999999"),
    (["llm", "--positive-nll-coef", "-1"], "positive_nll_coef must be a finite number >= 0"),
    (["llm", "--positive-nll-coef", "inf"], "got positive_nll_coef=inf"),
    (["llm", "--overlong-penalty-factor", "nan"], "got overlong_penalty_factor=nan"),
    (["llm", "--save-minutes", "inf"], "save_minutes must be a finite number >= 0"),
    (["llm", "--vocab-size", "10000000000"], "vocab_size must be <= 151936"),
    (["llm", "--digits", "30"], "digits must be in [1, 18]"),
    (["llm", "--device", "cuda:x"], "got device='cuda:x'"),
    (["llm", "--name", ".."], "plain folder name, got name='..'"),
    (
        ["llm", "--max-new-tokens", "100000", "--run-dir", "{tmp}/r", "--sft-steps", "0"],
        "lower max_new_tokens to at most",
    ),
    # h14: a seed torch cannot take, and a toy batch of terabytes, were tracebacks
    (["demo", "--seed", "99999999999999999999"], "--seed: must be <= 2**32 - 1"),
    (["demo", "--vocab", "100000000000"], "= 6400000000000 logits, more than the demo's"),
    (["train", "CartPole-v1", "--seed", "-1"], "--seed: must be >= 0, got -1"),
    # h14: a misspelt shipped name, a folder, a file or a run folder given for a folder
    (["experiment", "quikc"], "did you mean 'quick'?"),
    (["experiment", "{tmp}"], "is a folder; give a JSON config file"),
    (["report", "{file}"], "is a file; give an experiment folder or a runs folder"),
    (["plot", "{file}"], "is a file; give an experiment folder or a runs folder"),
    (["report", "{run}"], "is inside the experiment folder"),
    (["plot", "{run}/.."], "is inside the experiment folder"),
    (["report", "{corrupt}"], "experiment.json: not valid JSON"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    file = _file(tmp_path)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n')
    # a run folder of a grid (not an experiment folder), deep enough that {tmp} has no runs
    run = tmp_path / "nest" / "exp" / "V-ppo" / "0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"variant": "V-ppo", "kind": "bandit"}))
    corrupt = tmp_path / "nest" / "corrupt"
    shutil.copytree(tmp_path / "nest" / "exp", corrupt)
    (corrupt / "experiment.json").write_text("{")  # a hand edit cut short
    argv = [
        a.format(file=file, tmp=tmp_path, bad_jsonl=bad_jsonl, run=run, corrupt=corrupt)
        for a in argv
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("erc-gym"), lines[0]
    assert needle in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_a_reader_that_leaves_early_is_no_traceback():
    """``erc-gym experiment --list | head -1`` ended in a BrokenPipeError traceback (h14)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "erc_gym", "experiment", "--list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert err == ""


def test_unwritable_save_fails_before_training(tmp_path):
    """A subprocess: exit 2, one line, no traceback, and nothing trained or logged."""
    train = [sys.executable, "-m", "erc_gym", "train", "CartPole-v1", "--steps", "100000"]
    proc = subprocess.run(
        [*train, "--log-dir", str(tmp_path / "log"), "--save", _file(tmp_path) + "/m.zip"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"erc-gym train: error: --save {tmp_path}/file/m.zip: {tmp_path}/file is a file, "
        "not a folder"
    ]
    assert not (tmp_path / "log" / "progress.json").exists()


def test_help_texts_print_each_default_once_and_plain_percent(capsys):
    from erc_gym.llm.cli import build_parser

    text = build_parser().format_help()
    assert "(default: " not in text  # argparse's own "(default: X)" after ours
    assert text.count("(default 30)") == 1  # --steps
    for command in ("plot", "report"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "95%" in out and "%%" not in out


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    assert "--vocab" in capsys.readouterr().out


def test_demo_erc_narrows_the_entropy_ratio():
    kw = {"batch": 32, "vocab": 512, "steps": 6, "lr": 0.05, "seed": 1}
    ppo = demo.run(LossConfig.ppo(), **kw)[-1]
    erc = demo.run(LossConfig.ppo(erc=ERCConfig(0.95, 1.05)), **kw)[-1]
    assert erc["erc_clip_fraction"] > 0
    assert erc["entropy_ratio_max"] < ppo["entropy_ratio_max"]
    assert erc["entropy_ratio_min"] > ppo["entropy_ratio_min"]


def test_demo_batch_gradient_is_zero_only_when_every_sample_is_stopped():
    # the demo's closing sentence: with ERC the gradient vanishes once each sample is either
    # outside the band or PPO-clipped, and Adam's momentum keeps moving the logits after that
    from erc_gym.losses import ERCConfig, LossConfig

    kw = {"batch": 64, "vocab": 4096, "steps": 8, "lr": 0.05, "seed": 0}
    erc = demo.run(LossConfig.ppo(erc=ERCConfig(0.95, 1.05)), **kw)
    stopped = [m for m in erc if m["grad_norm"] == 0.0]
    assert stopped, "the demo's ERC run should reach a step without gradient"
    for m in stopped:
        assert m["erc_clip_fraction"] + m["clip_fraction"] >= 1.0
    assert stopped[-1]["entropy_ratio_min"] < stopped[0]["entropy_ratio_min"]  # momentum


def test_demo_worked_example_sampled_ratio_inside_clip_entropy_ratio_outside_band():
    """The tutorial's five-action example: PPO-clip sees nothing where ERC's band is left."""
    ppo = demo.worked_example(LossConfig.ppo())
    erc = demo.worked_example(LossConfig.ppo(erc=ERCConfig(0.95, 1.05)))
    after_two = ppo[1]
    assert 1.0 < after_two.ratio < 1.2  # inside PPO's clip ...
    assert after_two.entropy_ratio < 0.95  # ... and outside ERC's band
    assert after_two.tv_unsampled > 0.04  # un-sampled actions lost mass they were never given
    assert not any(w.clip_active for w in ppo[:3])  # PPO-clip is blind until r > 1.2
    assert [w.erc_kept for w in erc] == [True, True, False, False]
    assert erc[-1].probs == erc[1].probs  # SGD: a masked step leaves the logits alone
    assert ppo[-1].ratio > erc[-1].ratio
    # softmax coupling: step 1 moves every un-sampled logit by -lr * A * p_old(b)
    p_old = torch.softmax(torch.tensor(demo.WORKED_LOGITS, dtype=torch.float64), -1)
    assert ppo[0].logits_change[1:] == pytest.approx((-0.3 * p_old[1:]).tolist(), rel=1e-6)


def test_demo_blind_spots():
    swap, low = demo.blind_spots()
    assert swap.entropy_ratio == pytest.approx(1.0, abs=1e-12) and swap.tv == pytest.approx(0.3)
    assert low.tv == pytest.approx(0.001) and low.entropy_ratio > 1.5


def test_demo_prints_the_three_parts(capsys):
    demo.main(["--batch", "4", "--vocab", "16", "--steps", "2"])
    out = capsys.readouterr().out
    for part in (
        "1. One state, five actions",
        "2. What the entropy ratio cannot see",
        "3. A batch",
    ):
        assert part in out
    assert "MASK" in out


def test_report_of_run_folders_without_the_runner_record_is_one_line(tmp_path, capsys):
    """An experiment folder whose run folders lack the runner's record (variant, kind) was a
    traceback; it is one line and exit 2."""
    (tmp_path / "v" / "0").mkdir(parents=True)
    (tmp_path / "experiment.json").write_text(json.dumps({"name": "x", "kind": "llm"}))
    (tmp_path / "v" / "0" / "config.json").write_text(json.dumps({"model": "tiny"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no runs" in err[0] and str(tmp_path) in err[0]


def test_experiment_set_gives_every_run_a_setting(tmp_path, capsys):
    """``--set KEY=VALUE`` overrides the config's settings and the envs' own values (the knobs
    of the retired llm_compare script, for any config)."""
    argv = ["experiment", "quick", "--set", "iterations=2", "--set", "vocab_size=64"]
    main([*argv, "--seeds", "1", "--runs", str(tmp_path), "--no-report", "--no-progress"])
    records = sorted((tmp_path / "quick").glob("*/0/run.json"))
    assert len(records) == 2
    for path in records:
        trainer = json.loads(path.read_text())["trainer"]
        assert (trainer["iterations"], trainer["vocab_size"], trainer["group"]) == (2, 64, 16)
    for value, needle in (
        ("iterations=two", "iterations = 'two': Input should be a valid integer"),
        ("iterations", "--set: expected KEY=VALUE, got 'iterations'"),
        ("no_such=1", "no_such = 1: unknown key"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["experiment", "quick", "--set", value, "--runs", str(tmp_path / "x")])
        err = capsys.readouterr().err.splitlines()
        assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err


REFUSED_LATE = [
    ["train", "Nope-v0"],
    ["train", "CartPole-v1", "--save", "x/y/m.zip", "--erc-low", "1.2", "--erc-high", "0.9"],
    ["llm", "--max-new-tokens", "100000", "--sft-steps", "0"],
]


@pytest.mark.parametrize("argv", REFUSED_LATE, ids=" ".join)
def test_a_refused_command_leaves_no_folders(argv, tmp_path, monkeypatch, capsys):
    """The write checks of --log-dir, --save and --run-dir created the folders before the
    command was refused for another reason, leaving empty runs/ trees behind."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write call raises it: no file


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=errno.errorcode.get)
def test_train_save_on_a_full_disk_keeps_the_previous_model(code, tmp_path, monkeypatch, capsys):
    """A full disk at --save was an OSError traceback after training, and the model was lost;
    so was a folder that turned read-only during training."""
    import tempfile

    from erc_gym.sb3 import ERCPPO

    def failed_write(fd):
        raise OSError(code, os.strerror(code))

    target = tmp_path / "m.zip"
    target.write_bytes(b"the previous model")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "rescue"))
    (tmp_path / "rescue").mkdir()
    monkeypatch.setattr(os, "fsync", failed_write)
    argv = ["train", "CartPole-v1", "--save", str(target), *TINY]
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exc.value.code == 1
    line = _one_error_line(capsys)
    cause = os.strerror(code)
    assert line.startswith(
        f"erc-gym train: error: --save {target}: cannot write {target} ({cause})"
    )
    assert f"the previous {target} is unchanged" in line
    assert target.read_bytes() == b"the previous model"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.zip")] == []
    (rescued,) = (tmp_path / "rescue").glob("erc-gym-m-*.zip")
    assert f"saved to {rescued} instead" in line
    assert ERCPPO.load(rescued).num_timesteps == 64  # the trained model, not lost


def test_train_save_and_logs_on_a_real_full_disk(full_disk, tmp_path, capsys):
    target = full_disk / "m.zip"
    target.write_bytes(b"old")
    argv = ["train", "CartPole-v1", "--save", str(target), *TINY]
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exc.value.code == 1
    line = _one_error_line(capsys)
    assert f"cannot write {target} (No space left on device)" in line
    assert target.read_bytes() == b"old"
    # --log-dir on the full disk: every byte taken, the first log row cannot be written
    with open(full_disk / ".filler2", "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * 2**20)
    log_dir = full_disk / "log"
    with pytest.raises(SystemExit) as exc:
        main(["train", "CartPole-v1", "--steps", "64", "--n-envs", "1", "--no-progress",
              "--log-dir", str(log_dir)])  # fmt: skip
    assert exc.value.code == 1
    line = _one_error_line(capsys)
    assert line.startswith("erc-gym train: error: training stopped at step ")
    assert f"cannot write {log_dir}/progress.json (No space left on device)" in line


def test_train_logs_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from stable_baselines3.common.logger import JSONOutputFormat

    monkeypatch.setattr(JSONOutputFormat, "write", _no_space)
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path) for a in ["train", "CartPole-v1", *TINY]])
    assert exc.value.code == 1
    line = _one_error_line(capsys)
    assert line == (
        "erc-gym train: error: training stopped at step 32: cannot write "  # the first update
        f"{tmp_path}/log/progress.json (No space left on device)"
    )


def test_train_without_log_dir_keeps_earlier_runs(tmp_path, monkeypatch, capsys):
    """Every run without --log-dir wrote runs/train/progress.json over the previous run's."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        main(["train", "CartPole-v1", "--steps", "64", "--n-envs", "1", "--no-progress"])
    out = capsys.readouterr().out
    first, second = (tmp_path / "runs/train" / f"CartPole-v1-ercppo-{n}" for n in (1, 2))
    assert first.joinpath("progress.json").stat().st_size > 0
    assert second.joinpath("progress.json").stat().st_size > 0
    assert "logs: runs/train/CartPole-v1-ercppo-1/progress.json" in out
    assert "logs: runs/train/CartPole-v1-ercppo-2/progress.json" in out


@pytest.mark.parametrize(
    "algo",
    [pytest.param("ercppo", marks=pytest.mark.slow), "a2c"],  # ercppo: 2048-step rollouts
)
def test_train_continuous_actions_without_erc(algo, tmp_path, capsys):
    """``train Pendulum-v1 --no-erc`` (and --algo a2c) ended in a traceback from the entropy
    callback, which needs discrete actions; ERC itself is refused there (test above)."""
    argv = ["train", "Pendulum-v1", *TINY, "--algo", algo]
    main([a.format(tmp=tmp_path) for a in argv] + (["--no-erc"] if algo == "ercppo" else []))
    captured = capsys.readouterr()
    assert "Pendulum-v1: " in captured.out
    assert "no diagnostics/* keys" in captured.err
    rows = (tmp_path / "log" / "progress.json").read_text().splitlines()
    assert rows and not any("diagnostics/" in r for r in rows)
