"""The package's metadata: version on the command line, license file, classifiers, URLs."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import erc_gym
from erc_gym.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"erc-gym {erc_gym.__version__}\n"
    assert erc_gym.__version__ == importlib.metadata.version("erc-gym")


def test_metadata_declares_mit_with_its_license_file_classifiers_and_urls():
    meta = importlib.metadata.metadata("erc-gym")
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 erc_gym developers\n")
    assert "WITHOUT WARRANTY OF ANY KIND" in text
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3" in classifiers
    assert any(c.startswith("Topic :: Scientific/Engineering") for c in classifiers)
    assert meta.get_all("Project-URL")
