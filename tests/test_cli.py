"""The erc-gym command line and the README example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from erc_gym import demo
from erc_gym.losses import ERCConfig, LossConfig

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help():
    out = subprocess.run(
        [sys.executable, "-m", "erc_gym", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in out


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


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        # the SB3 snippet trains for 50k steps; run it with a token budget instead
        block = block.replace("model.learn(50_000, progress_bar=True)", "model.learn(256)")
        exec(compile(block, "README.md", "exec"), {})
