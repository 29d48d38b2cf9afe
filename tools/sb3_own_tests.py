"""Run Stable-Baselines3's own PPO tests against ERCPPO, with ERC off and with ERC on.

SB3's test suite is not in its wheel; this script downloads the source distribution of the
installed SB3 version with pip (``pip download --no-deps --no-binary :all:``), extracts its
``tests/`` folder under ``--dest`` (git-ignored ``runs/``; nothing of SB3's is committed) and runs
the tests selected by ``-k ppo`` (every test whose name or parameter id says PPO) three times:

* ``sb3``: unchanged, SB3's own PPO (the baseline: what fails here is the environment's doing,
  e.g. a missing optional dependency);
* ``off``: ``PPO`` replaced by ``ERCPPO(erc_low=None, erc_high=None)`` (ERC off);
* ``on``: ``PPO`` replaced by ``ERCPPO`` with its defaults (ERC band (0.95, 1.05)).

The replacement is this module loaded as a pytest plugin (``-p sb3_own_tests``), which swaps
``stable_baselines3.PPO`` before SB3's test modules are imported. It prints the counts of each
run and every test whose outcome differs from the baseline, with the first line of its error,
and writes ``summary.json`` under ``--dest``. ``docs/sb3.md`` quotes the result.

Usage::

    python tools/sb3_own_tests.py                 # all three runs
    python tools/sb3_own_tests.py --modes off on  # skip the baseline
    python tools/sb3_own_tests.py -k "ppo and not cnn" --pytest-args -x
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from erc_gym.cli_args import CliParser

MODES = ("sb3", "off", "on")
_MODE_ENV = "ERC_GYM_SB3_TESTS_MODE"
#: The constructor error ERCPPO raises by design for continuous actions with ERC on.
_BY_DESIGN = "ERC needs a discrete action space"


# ---------------------------------------------------------------------------- pytest plugin


def pytest_configure(config: Any) -> None:
    """Replace ``stable_baselines3.PPO`` before SB3's test modules import it."""
    mode = os.environ.get(_MODE_ENV, "sb3")
    if mode == "sb3":
        return
    import stable_baselines3
    import stable_baselines3.ppo

    from erc_gym.sb3 import ERCPPO

    replacement = ERCPPO if mode == "on" else _erc_off_class()
    for module in (stable_baselines3, stable_baselines3.ppo):
        setattr(module, "PPO", replacement)  # noqa: B010 -- a module attribute swapped at run time


def _erc_off_class() -> type:
    from erc_gym.sb3 import ERCPPO

    class ERCPPO_OFF(ERCPPO):
        """ERCPPO whose ERC band defaults to None (off), for SB3 tests that construct PPO."""

        def __init__(
            self,
            policy: Any,
            env: Any,
            *args: Any,
            erc_low: Any = None,
            erc_high: Any = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(policy, env, *args, erc_low=erc_low, erc_high=erc_high, **kwargs)

    # Shown as ERCPPO in test ids and messages; found as this module's ERCPPO_OFF by pickle.
    ERCPPO_OFF.__name__ = "ERCPPO"
    ERCPPO_OFF.__qualname__ = "ERCPPO_OFF"
    globals()["ERCPPO_OFF"] = ERCPPO_OFF
    return ERCPPO_OFF


# ---------------------------------------------------------------------------- driver


def fetch_tests(dest: Path) -> Path:
    """Download SB3's sdist for the installed version and extract ``tests/`` + pytest config."""
    import stable_baselines3

    version = stable_baselines3.__version__
    root = dest / f"stable_baselines3-{version}"
    if (root / "tests").is_dir():
        return root
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"stable-baselines3=={version}",
            "-d",
            str(dest),
        ],
        check=True,
    )
    sdist = dest / f"stable_baselines3-{version}.tar.gz"
    prefix = f"stable_baselines3-{version}/"
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix + "tests/") or m.name == prefix + "pyproject.toml"
        ]
        tar.extractall(dest, members=members, filter="data")
    return root


def run_mode(root: Path, mode: str, keyword: str, extra: list[str]) -> dict[str, Any]:
    """Run the selected SB3 tests in one mode; outcomes per test id from a JUnit XML report."""
    report = root.parent / f"junit-{mode}.xml"
    env = {
        **os.environ,
        _MODE_ENV: mode,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "sb3_own_tests",
        "-p",
        "no:cacheprovider",
        "-c",
        str(root / "pyproject.toml"),
        "--rootdir",
        str(root),
        "--continue-on-collection-errors",
        "-k",
        keyword,
        f"--junitxml={report}",
        *extra,
        str(root / "tests"),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    outcomes = read_report(report)
    counts: dict[str, int] = {}
    for outcome, _ in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    return {"counts": counts, "outcomes": outcomes, "seconds": round(seconds), "tail": tail}


def read_report(report: Path) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first line of the message)}`` from a JUnit XML report."""
    outcomes: dict[str, tuple[str, str]] = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            # the replacement shows as ERCPPO in parameter ids: compare under SB3's name
            name = name.replace("ERCPPO", "PPO")
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    text = node.get("message") or node.text or ""
                    message = text.strip().splitlines()[0][:200] if text.strip() else ""
                    break
            outcomes[name] = (outcome, message)
    return outcomes


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--dest", type=Path, default=Path("runs/sb3_own_tests"), help="download/extract folder"
    )
    parser.add_argument("-k", dest="keyword", default="ppo", help="pytest -k selection")
    parser.add_argument(
        "--pytest-args", nargs=argparse.REMAINDER, default=[], help="passed on to pytest"
    )
    args = parser.parse_args(argv)

    root = fetch_tests(args.dest.resolve())
    results = {}
    for mode in args.modes:
        results[mode] = run_mode(root, mode, args.keyword, args.pytest_args)
        counts = results[mode]["counts"]
        print(f"[{mode}] {json.dumps(counts, sort_keys=True)} in {results[mode]['seconds']} s")

    # the baseline of this invocation, or of an earlier one (runs of one mode each can overlap)
    base = results.get("sb3", {}).get("outcomes") or read_report(root.parent / "junit-sb3.xml")
    for mode in ("off", "on"):
        if mode not in results:
            continue
        changed = {
            name: value
            for name, value in results[mode]["outcomes"].items()
            if value[0] in ("failed", "error") and base.get(name, ("passed", ""))[0] == "passed"
        }
        by_design = {n: v for n, v in changed.items() if _BY_DESIGN in v[1]}
        other = {n: v for n, v in changed.items() if n not in by_design}
        print(
            f"\n[{mode}] {len(changed)} tests fail that pass with SB3's PPO"
            f" ({len(by_design)} raise '{_BY_DESIGN}' by design):"
        )
        for name, (outcome, message) in sorted(other.items()):
            print(f"  {outcome}: {name}\n      {message}")
        results[mode]["differs_from_sb3"] = {n: list(v) for n, v in changed.items()}

    summary = {
        mode: {k: v for k, v in res.items() if k != "outcomes"} for mode, res in results.items()
    }
    out = args.dest / f"summary-{'-'.join(args.modes)}.json"
    out.write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
