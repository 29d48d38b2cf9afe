"""Fuzzing the command line: random and boundary values for every flag of every subcommand.

Each case calls ``erc_gym.cli.main(argv)`` in this process and must end with exit status 0 or 2
(130 for an interrupt), never an exception, within ``CASE_SECONDS``; an exit 2 ends with one
``erc-gym ...: error: ...`` line. The flags come from the commands' own parsers (captured when
``main`` builds them), so a flag added later is fuzzed too.

What keeps it honest and fast: the parsing and every check up to the work itself are the real
code; the work is replaced by a stub that records its arguments and stops the case (``Reached``)
-- building the environments for ``train``, building the trainer for ``llm``, running the grid and
writing the report for ``experiment``, the figures and report for ``plot`` / ``report``, the toy
optimisation for ``demo``. A case that reaches a stub counts as accepted (exit 0). The checks made
while an SB3 model or an LLM trainer is built (ERC band, action space, context length, dtype)
run for real in ``test_train_and_llm_construction_fuzz``, with training itself stubbed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from erc_gym import cli_args
from erc_gym.cli import COMMANDS, main
from erc_gym.cli_args import CliParser

#: Cases per subcommand in the default suite (ERC_GYM_FUZZ_CASES raises it).
CASES = int(os.environ.get("ERC_GYM_FUZZ_CASES", "500"))
#: A case that runs longer than this hangs (a size nobody checked, a loop); generous, for a
#: loaded machine.
CASE_SECONDS = 60
ERROR_LINE = re.compile(r"erc-gym( [a-z]+)?: error: \S")

INTS = ["0", "1", "2", "3", "-1", "7", "64", "1000", "4097", "2147483648", "4294967295",
        "4294967296", "9223372036854775808", "99999999999999999999", "1e3", "1.5", "0x10",
        "1_000", " 3", "-0"]  # fmt: skip
FLOATS = ["0", "0.0", "-0.0", "1e-300", "0.05", "0.5", "0.95", "1", "1.05", "1.5", "2", "10",
          "1e308", "1e309", "nan", "NaN", "inf", "-inf", "-1", "-0.5", "1,5"]  # fmt: skip
BOOLS = ["true", "false", "TRUE", "yes", "no", "1", "0", "on", "off", "ture", "", "none"]
STRINGS = ["", " ", "x", "none", "None", "-", "é", "..", ".", "%s", "{}", "a" * 300, "-x"]
#: Paths, relative to each case's temporary folder (absolute ones only where nothing is made).
PATHS = ["runs", "out", "out/m.zip", "file.txt", "file.txt/x", "missing/dir/m.zip", "exp",
         "exp/V-ppo/0", "bad.json", "good.json", "empty.json", "/dev/null/x", "a" * 300,
         "deep/" * 20 + "m.zip", "out/"]  # fmt: skip
ENV_IDS = ["CartPole-v1", "Pendulum-v1", "Acrobot-v1", "erc_gym/VocabBandit-v0", "Nope-v0",
           "erc_gym/", "erc_gym/TokenSequence-v0", "cartpole-v1", "ALE/Pong-v5"]  # fmt: skip


class Reached(BaseException):
    """Raised by a stub in place of the work: the arguments were accepted."""


class CaseTimeout(BaseException):
    """A case ran past CASE_SECONDS."""


def capture_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser ``main`` builds for ``command`` (None: the top level)."""
    prog = "erc-gym" if command is None else f"erc-gym {command}"
    real = CliParser.parse_args
    found: list[argparse.ArgumentParser] = []

    def grab(self: Any, args: Any = None, namespace: Any = None) -> Any:
        if self.prog == prog:
            found.append(self)
            raise Reached
        return real(self, args, namespace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CliParser, "parse_args", grab)
        with contextlib.suppress(Reached, SystemExit):
            main(["x"] if command is None else [command, "x"])
    assert found, f"no parser for {prog}"
    return found[0]


def _pool(action: argparse.Action, rng: random.Random) -> list[str]:
    kind = action.type
    if kind in (cli_args.positive_int, cli_args.non_negative_int, cli_args.seed):
        pool = INTS
    elif kind is cli_args.positive_float:
        pool = FLOATS
    elif kind is cli_args.boolean:
        pool = BOOLS
    elif kind is None:
        pool = PATHS + STRINGS
    else:  # the commands' own converters (erc-gym llm's "<type> or none", demo's --vocab)
        pool = INTS + FLOATS + BOOLS + STRINGS
    if rng.random() < 0.15:  # any flag, any value
        pool = INTS + FLOATS + BOOLS + STRINGS + PATHS
    return pool


def _value(action: argparse.Action, rng: random.Random) -> str:
    if action.choices and rng.random() < 0.7:
        return str(rng.choice(list(action.choices)))
    roll = rng.random()
    if roll < 0.1:
        return str(rng.randint(-5, 10**6))
    if roll < 0.15:
        return repr(rng.uniform(-2, 3) * 10 ** rng.randint(-8, 8))
    return rng.choice(_pool(action, rng))


def make_argv(parser: argparse.ArgumentParser, rng: random.Random, first: list[str]) -> list[str]:
    """Random flags (0-4 of them, each with a random value) around the positional arguments."""
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    argv = list(first)
    for action in rng.sample(options, k=min(len(options), rng.randint(0, 4))):
        flag = rng.choice(action.option_strings)
        if action.nargs == 0:  # store_true, --version
            argv.append(flag)
        else:
            argv += [flag, _value(action, rng)]
    roll = rng.random()
    if roll < 0.03:
        argv.append("--help")
    elif roll < 0.06:
        argv.append("--no-such-flag")
    elif roll < 0.09 and options:
        argv.append(rng.choice(options).option_strings[0])  # a flag without its value
    elif roll < 0.12:
        argv.append("stray")
    rng.shuffle(argv) if rng.random() < 0.05 else None
    return argv


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_case(argv: list[str]) -> tuple[int | str, str]:
    """``main(argv)``: its exit status ("reached" past every check) and its stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with time_limit(CASE_SECONDS):
                main(argv)
            code: int | str = 0
        except Reached:
            code = "reached"
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except CaseTimeout:
            code = "timeout"
        except Exception as exc:  # a traceback for the user
            code = f"{type(exc).__name__}: {exc}"
    return code, err.getvalue()


def check_case(
    case: int, argv: list[str], allowed: tuple[int | str, ...], outcomes: dict[str, int]
) -> None:
    """Run one case; its exit status must be allowed, an exit 2 must end with one error line."""
    code, err = run_case(argv)
    where = f"case {case}: erc-gym {' '.join(map(repr, argv))}"
    assert code in allowed, f"{where}: {code}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{where}\n{err[-2000:]}"
    if code == 2:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert ERROR_LINE.match(last), f"{where}: exit 2 without an error line: {err!r}"
    outcomes[str(code)] = outcomes.get(str(code), 0) + 1


def _stop(*args: Any, **kwargs: Any) -> Any:
    raise Reached


@pytest.fixture
def playground(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working folder with the files the fuzzed paths name, and the work stubbed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "bad.json").write_text('{"name": "x", "kind": ')
    (tmp_path / "empty.json").write_text("")
    good = {"name": "fuzz", "kind": "bandit", "seeds": 1, "algorithms": ["ppo"]}
    good |= {"envs": [{"label": "V16", "vocab_size": 16}], "settings": {"iterations": 1}}
    (tmp_path / "good.json").write_text(json.dumps(good))
    run = tmp_path / "exp" / "V-ppo" / "0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"variant": "V-ppo", "kind": "bandit"}))
    (tmp_path / "exp" / "experiment.json").write_text(json.dumps({"name": "exp"}))
    # the work each command would start once its arguments are accepted (see the docstring)
    import stable_baselines3.common.env_util as env_util

    import erc_gym.demo
    import erc_gym.lab.plots
    import erc_gym.lab.report
    import erc_gym.lab.runner
    import erc_gym.llm.cli

    monkeypatch.setattr(env_util, "make_vec_env", _stop)
    monkeypatch.setattr(erc_gym.llm.cli, "ERCTrainer", _stop)
    monkeypatch.setattr(erc_gym.lab.runner, "run_experiment", _stop)
    monkeypatch.setattr(erc_gym.lab.report, "write_report", _stop)
    monkeypatch.setattr(erc_gym.lab.plots, "plot_experiment", _stop)
    monkeypatch.setattr(erc_gym.demo, "run", _stop)
    return tmp_path


def _first_args(command: str | None, rng: random.Random) -> list[str]:
    """The positional arguments (and the subcommand) of one case."""
    if command is None:
        return []
    if command == "train":
        return [command, rng.choice([*ENV_IDS, rng.choice(STRINGS)])]
    if command == "experiment":
        names = ["quick", "quikc", "good.json", "bad.json", "empty.json", "exp", "file.txt"]
        return [command, *([rng.choice([*names, *STRINGS])] if rng.random() < 0.9 else [])]
    if command in ("plot", "report"):
        return [command, rng.choice([*PATHS, *STRINGS])]
    return [command]


SUBCOMMANDS: list[str | None] = [None, *COMMANDS]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: c or "top-level")
def test_cli_fuzz(command: str | None, playground: Path) -> None:
    rng = random.Random(f"erc-gym fuzz {command}")
    if command is None:
        parser = capture_parser(None)
        # the top level: its own flags, then a command name or anything else
        firsts = [*COMMANDS, "", "-h", "--version", "TRAIN", "trian", "--", "-x", "train=1"]
    else:
        parser = capture_parser(command)
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    for case in range(CASES):
        if command is None:
            argv = make_argv(parser, rng, [])
            argv = [rng.choice(firsts), *argv] if rng.random() < 0.7 else argv
        else:
            argv = make_argv(parser, rng, _first_args(command, rng))
        check_case(case, argv, (0, 2, 130, "reached"), outcomes)
    seconds = time.perf_counter() - start
    print(f"{command or 'top level'}: {CASES} cases in {seconds:.1f} s: {outcomes}")
    # the fuzz must reach both sides: accepted cases and refused ones
    assert outcomes.get("2", 0) > CASES // 20, outcomes
    if command is not None:
        assert outcomes.get("reached", 0) + outcomes.get("0", 0) > CASES // 50, outcomes


#: Cases of the construction fuzz (each builds environments and a model, or an LLM trainer).
BUILD_CASES = int(os.environ.get("ERC_GYM_FUZZ_BUILD_CASES", "40"))


@pytest.mark.parametrize("command", ["train", "llm"])
def test_train_and_llm_construction_fuzz(
    command: str, playground: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same fuzz, past the stubs of test_cli_fuzz: SB3 builds the environments and the model
    (ERC band, action space, clip settings), the LLM trainer its data, tokenizer and model
    (context length, dtype, device); only the warm start and training are stubbed."""
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

    import erc_gym.llm.cli
    import erc_gym.llm.model
    from erc_gym.llm.trainer import ERCTrainer

    monkeypatch.undo()  # the stubs of the playground, not its folder: back into it below
    monkeypatch.chdir(playground)
    from erc_gym.sb3 import ERCPPO

    for cls in (ERCPPO, PPO, A2C, OnPolicyAlgorithm, BaseAlgorithm):
        if "learn" in vars(cls):
            monkeypatch.setattr(cls, "learn", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(erc_gym.llm.model, "sft_warmstart", lambda *args, **kwargs: [])
    monkeypatch.setattr(ERCTrainer, "train", lambda self, *args, **kwargs: [])
    assert erc_gym.llm.cli.ERCTrainer is ERCTrainer
    rng = random.Random(f"erc-gym construction fuzz {command}")
    parser = capture_parser(command)
    # a first build outside the count: it imports SB3's and transformers' modules (slow)
    warm_up = [command, "CartPole-v1", "--no-progress"] if command == "train" else [command]
    assert run_case(warm_up)[0] == 0
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    for case in range(BUILD_CASES):
        first = [command] + ([rng.choice(ENV_IDS[:5])] if command == "train" else [])
        argv = make_argv(parser, rng, first)
        if command == "train":
            argv += ["--no-progress"]
        check_case(case, argv, (0, 2), outcomes)
    seconds = time.perf_counter() - start
    print(f"{command} (built): {BUILD_CASES} cases in {seconds:.1f} s: {outcomes}")
    assert outcomes.get("0", 0) > 0 and outcomes.get("2", 0) > 0, outcomes
