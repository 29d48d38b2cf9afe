"""The erc-gym command line and the README example."""

from __future__ import annotations

import json
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

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("doc", ["README.md", "docs/experiments.md"])
def test_doc_examples_run(doc):
    text = (ROOT / doc).read_text()
    # a block marked <!-- slow --> or <!-- no-run: ... --> on the line before its fence is skipped
    blocks = re.findall(r"(?<!-->\n)```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{doc} has no python example"
    for block in blocks:
        # the SB3 snippet trains for 50k steps; run it with a token budget instead
        block = block.replace("model.learn(50_000, progress_bar=True)", "model.learn(256)")
        exec(compile(block, doc, "exec"), {})


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
