"""Light core imports: the loss and entropy modules pull in torch only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("gymnasium", "stable_baselines3", "matplotlib", "transformers")


def _loaded_after(statement: str) -> list[str]:
    probe = f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    code = f"{statement}\nimport json, sys\n{probe}"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import erc_gym.losses",
        "import erc_gym.entropy",
        "import erc_gym",
        "import erc_gym.advantages",
    ],
)
def test_core_imports_are_light(statement: str) -> None:
    assert _loaded_after(statement) == []


def test_llm_path_does_not_import_sb3() -> None:
    loaded = _loaded_after("import erc_gym.diagnostics, erc_gym.llm.trainer")
    assert "stable_baselines3" not in loaded


def test_lazy_names_resolve() -> None:
    import erc_gym
    from erc_gym.sb3 import EntropyDynamicsCallback
    from erc_gym.sb3.callbacks import EntropyDynamicsCallback as Direct

    assert EntropyDynamicsCallback is Direct
    for name in erc_gym.__all__:
        assert getattr(erc_gym, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = erc_gym.no_such_name


def test_import_erc_gym_registers_envs_when_gymnasium_is_loaded() -> None:
    code = (
        "import gymnasium as gym, erc_gym\n"
        "env = gym.make('erc_gym/VocabBandit-v0', vocab_size=8)\n"
        "print(env.action_space.n)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "8"
