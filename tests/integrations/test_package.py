"""erc_gym.integrations stays importable and light without any engine installed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_integrations_package_imports_no_engine():
    code = (
        "import erc_gym.integrations, json, sys\n"
        "print(json.dumps([m for m in ('trl', 'verl', 'transformers') if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_trl_adapter_without_trl_names_the_extra():
    try:
        import trl  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TRL is installed here")
    with pytest.raises(ImportError, match=r"erc-gym\[trl\]"):
        import erc_gym.integrations.trl  # noqa: F401
