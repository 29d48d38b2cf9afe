"""Argument parsing shared by every ``erc-gym`` subcommand: one-line errors, strict value types.

A command-line mistake (an unknown name, ``--steps 0``, a missing folder, ``--flag ture``) ends
with exactly one line on stderr, ``<prog>: error: <what is wrong>``, and exit status 2, never a
traceback and never argparse's multi-line usage block (``--help`` has the usage).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from erc_gym.limits import MAX_SEED

__all__ = [
    "MAX_SEED",
    "CliParser",
    "boolean",
    "fail",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "seed",
    "setting",
    "writable_dir",
    "writable_file",
]

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def fail(prog: str, message: str) -> NoReturn:
    """Print ``<prog>: error: <message>`` (one line) to stderr and exit with status 2."""
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


class CliParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        """One line on stderr, exit 2 (argparse prints the usage block first)."""
        fail(self.prog, f"{message} (see --help)")


def _whole_number(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= {low}, got {text!r}"
        ) from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (``--steps 0`` is an error, not "use the default")."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _whole_number(text, 0)


def seed(text: str) -> int:
    """A random seed: an integer in ``[0, 2**32 - 1]``."""
    value = _whole_number(text, 0)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be <= 2**32 - 1 = {MAX_SEED}, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: a value in JSON (``3``, ``1e-4``, ``true``, ``null``, ``"+-*"``), or else
    the text itself (``ops=+-*``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def boolean(text: str) -> bool:
    """``true/false`` (also ``1/0``, ``yes/no``, ``on/off``); anything else is an error."""
    low = text.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def writable_file(prog: str, flag: str, path: str) -> None:
    """Exit 2 now, not after a long run, if the file ``path`` cannot be written.

    Its folder is created if missing (as the writer would).
    """
    parent = Path(path).expanduser().absolute().parent
    if parent.exists() and not parent.is_dir():
        fail(prog, f"{flag} {path}: {parent} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        fail(prog, f"{flag} {path}: cannot write to {parent} ({err.strerror or err})")
    if Path(path).is_dir():
        fail(prog, f"{flag} {path}: is a folder, expected a file path")


def writable_dir(prog: str, flag: str, path: str) -> None:
    """Exit 2 now if the folder ``path`` cannot be created or written."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        fail(prog, f"{flag} {path}: cannot write there ({err.strerror or err})")
