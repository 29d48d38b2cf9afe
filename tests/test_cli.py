"""The erc-gym command line and the README example."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    with pytest.raises(SystemExit, match="no runs"):
        main(["report", str(tmp_path / "runs" / "mini" / "V32-ppo")])


def test_train_command_logs_sb3_and_diagnostic_keys(tmp_path):
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
    assert any("train/erc_clip_fraction" in r for r in rows)
    assert any("diagnostics/entropy_volatility" in r for r in rows)
    assert (tmp_path / "model.zip").exists()


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


@pytest.mark.parametrize("doc", ["README.md", "docs/tutorial_entropy.md"])
def test_doc_examples_run(doc):
    text = (ROOT / doc).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{doc} has no python example"
    for block in blocks:
        # the SB3 snippet trains for 50k steps; run it with a token budget instead
        block = block.replace("model.learn(50_000, progress_bar=True)", "model.learn(256)")
        exec(compile(block, doc, "exec"), {})
