"""Every code block of README.md and docs/*.md runs, and its printed output is what the doc shows.

Blocks fenced as ``python``/``py`` run with this interpreter; ``bash``/``sh``/``shell`` with
``bash`` (``set -eo pipefail``); ``console`` blocks are sessions: ``$ `` lines are commands,
the other lines their expected output. Each block runs on its own, from the repository root of a
temporary copy of the checkout (so ``runs/`` and other outputs never land in it), with the venv's
``bin`` first on ``PATH`` (``erc-gym`` is found). Markers, on the line right before a fence:

* ``<!-- no-run: <reason> -->``: not run; the test is skipped with that reason (a GPU, a long
  grid, an install step, placeholder paths).
* ``<!-- slow -->``: run only under ``pytest -m slow`` (``make test-slow``).
* An output block -- a ``text`` fence, or a ``console`` fence without ``$ `` lines -- right after
  a code block (blank lines and markers between) is that block's expected stdout, compared line
  by line after stripping trailing spaces. A line ``...`` stands for any number of lines.
  ``<!-- output-tolerance: X -->`` before the output fence lets every number differ by X (absolute
  or relative, whichever is larger); ``<!-- no-compare: <reason> -->`` shows output that is not
  compared (timings, paths).

Why a small collector and not pytest-markdown-docs or phmdoctest: those run Python only (or mark
blocks with their own info strings), while this project's docs are mostly shell commands and the
team's convention is the HTML comments above, which no tool reads; the Markdown itself is parsed
by markdown-it-py (CommonMark, the parser rich uses), not by regular expressions.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell"}
RUNNABLE = PYTHON | SHELL | {"console"}
#: Seconds a block may run (a slow one too: a block that needs more is no-run with a reason);
#: a 50,000-step SB3 run took 20 minutes on a loaded 2-core machine.
TIMEOUT = {False: 300, True: 3600}
MARKER = re.compile(r"<!--\s*(no-run|slow|output-tolerance|no-compare)\s*(?::\s*(.*?))?\s*-->")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
#: What the copy of the checkout leaves out (environments, caches, earlier outputs).
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv*", "runs", "__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "build"
)


@dataclass
class Block:
    """One runnable code block and what its doc says about it."""

    doc: str
    line: int
    lang: str
    code: str
    no_run: str | None = None
    slow: bool = False
    expected: str | None = None
    tolerance: float = 0.0
    no_compare: str | None = None


def _markers(lines: list[str], fence_line: int) -> dict[str, str]:
    """The markers on the lines right above the fence at 0-based ``fence_line``."""
    found: dict[str, str] = {}
    i = fence_line - 1
    while i >= 0 and (match := MARKER.fullmatch(lines[i].strip())):
        found.setdefault(match.group(1), match.group(2) or "")
        i -= 1
    return found


def collect(path: Path) -> list[Block]:
    """The runnable blocks of one Markdown file, with their markers and expected output.

    Raises:
        ValueError: a ``no-run`` or ``no-compare`` marker without a reason, or a bad tolerance.
    """
    text = path.read_text()
    lines = text.splitlines()
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    fences = [t for t in MarkdownIt("commonmark").parse(text) if t.type == "fence" and t.map]
    blocks: list[Block] = []
    previous: tuple[Block, int] | None = None  # the last code block and its closing line
    for token in fences:
        assert token.map is not None
        start, end = token.map
        lang = token.info.strip().split(" ")[0].lower()
        marks = _markers(lines, start)
        for key in ("no-run", "no-compare"):
            if key in marks and not marks[key]:
                raise ValueError(f"{name}:{start + 1}: <!-- {key}: ... --> needs a reason")
        session = lang == "console" and any(
            ln.startswith("$ ") for ln in token.content.splitlines()
        )
        between = lines[previous[1] : start] if previous else []
        adjacent = previous is not None and all(
            not ln.strip() or MARKER.fullmatch(ln.strip()) for ln in between
        )
        if lang in ("text", "console") and not session and adjacent:
            assert previous is not None
            block = previous[0]
            block.expected = token.content
            block.no_compare = marks.get("no-compare")
            if "output-tolerance" in marks:
                try:
                    block.tolerance = float(marks["output-tolerance"])
                except ValueError:
                    raise ValueError(
                        f"{name}:{start + 1}: output-tolerance needs a number, got "
                        f"{marks['output-tolerance']!r}"
                    ) from None
            previous = None
            continue
        if lang not in RUNNABLE:
            previous = None
            continue
        block = Block(name, start + 1, lang, token.content, marks.get("no-run"), "slow" in marks)
        if session:
            commands = [ln[2:] for ln in token.content.splitlines() if ln.startswith("$ ")]
            shown = [ln for ln in token.content.splitlines() if not ln.startswith("$ ")]
            block.code = "\n".join(commands) + "\n"
            block.expected = "\n".join(shown) + "\n" if any(s.strip() for s in shown) else None
        blocks.append(block)
        previous = (block, end)
    return blocks


def _numbers_close(want: str, got: str, tolerance: float) -> bool:
    """Equal text around the numbers, and each number within ``tolerance``."""
    if NUMBER.sub("#", want) != NUMBER.sub("#", got):
        return False
    pairs = zip(NUMBER.findall(want), NUMBER.findall(got), strict=True)
    return all(
        math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=tolerance) for a, b in pairs
    )


def output_matches(expected: str, actual: str, tolerance: float = 0.0) -> bool:
    """Whether ``actual`` stdout is what the doc shows (``...`` lines match any lines)."""

    def clean(text: str) -> list[str]:
        rows = [ln.rstrip() for ln in text.splitlines()]
        while rows and not rows[0]:
            rows.pop(0)
        while rows and not rows[-1]:
            rows.pop()
        return rows

    def match(want: list[str], got: list[str]) -> bool:
        if not want:
            return not got
        if want[0] == "...":
            return any(match(want[1:], got[i:]) for i in range(len(got) + 1))
        return bool(got) and _numbers_close(want[0], got[0], tolerance) and match(want[1:], got[1:])

    return match(clean(expected), clean(actual))


def run_block(block: Block, workdir: Path, scratch: Path) -> subprocess.CompletedProcess[str]:
    """Run ``block`` with ``workdir`` as the current folder (the block's file in ``scratch``)."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
    }
    if block.lang in PYTHON:
        script = scratch / "block.py"
        script.write_text(block.code)
        argv = [sys.executable, str(script)]  # not -c: the copy's erc_gym/ must not shadow
    else:
        script = scratch / "block.sh"
        script.write_text("set -eo pipefail\n" + block.code)
        argv = ["bash", str(script)]
    return subprocess.run(
        argv,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT[block.slow],
        stdin=subprocess.DEVNULL,
    )


def _params() -> list[object]:
    params = []
    for path in DOCS:
        for block in collect(path):
            marks = [pytest.mark.slow] if block.slow else []
            if block.no_run is not None:
                marks.append(
                    pytest.mark.skip(reason=f"{block.doc}:{block.line} no-run: {block.no_run}")
                )
            params.append(pytest.param(block, marks=marks, id=f"{block.doc}:{block.line}"))
    return params


@pytest.mark.parametrize("block", _params())
def test_doc_block_runs(block: Block, tmp_path: Path) -> None:
    workdir = tmp_path / "repo"
    shutil.copytree(ROOT, workdir, ignore=NOT_COPIED, symlinks=True)
    done = run_block(block, workdir, tmp_path)
    where = f"{block.doc}:{block.line} ({block.lang})"
    assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stderr[-3000:]}"
    if block.expected is not None and block.no_compare is None:
        assert output_matches(block.expected, done.stdout, block.tolerance), (
            f"{where} printed\n{done.stdout}\nbut the doc shows\n{block.expected}"
        )


def test_every_doc_has_its_blocks_collected() -> None:
    """The docs the suite runs: README.md and docs/*.md, each python/shell block found."""
    blocks = [b for path in DOCS for b in collect(path)]
    readme = [b for b in blocks if b.doc == "README.md"]
    assert "python" in [b.lang for b in readme]
    assert any(b.expected for b in readme)  # the loss example's printed line is compared
    assert all(b.no_run is None or b.no_run.strip() for b in blocks)


SAMPLE = """\
# A doc

```python
print("ran")
```

<!-- no-run: needs a GPU -->
```bash
nvidia-smi
```

<!-- slow -->
```bash
echo slow
```

```python
print("loss 0.5012, 3 steps")
print("timing 12 ms")
```

<!-- output-tolerance: 0.01 -->
```text
loss 0.5, 3 steps
...
```

```console
$ echo hello
hello
```

```python
print(1)
```
<!-- no-compare: timings vary -->
```text
2
```
"""


def test_the_convention_on_a_sample(tmp_path: Path) -> None:
    """The markers do what the module docstring says; a wrong output is caught."""
    doc = tmp_path / "sample.md"
    doc.write_text(SAMPLE)
    first, gpu, slow, loss, console, timing = collect(doc)
    assert first.expected is None and first.no_run is None and not first.slow
    assert gpu.no_run == "needs a GPU" and slow.slow
    assert loss.tolerance == 0.01 and loss.expected is not None
    assert output_matches(loss.expected, "loss 0.5012, 3 steps\ntiming 12 ms\n", loss.tolerance)
    assert not output_matches(loss.expected, "loss 0.52, 3 steps\n", loss.tolerance)
    assert not output_matches(loss.expected, "loss 0.5, 4.5 steps\n", loss.tolerance)
    assert not output_matches("a\nb\n", "a\n")
    assert console.code == "echo hello\n" and console.expected == "hello\n"
    assert timing.no_compare == "timings vary"
    for block in (first, console, loss):
        done = run_block(block, tmp_path, tmp_path)
        assert done.returncode == 0, done.stderr
        if block.expected is not None:
            assert output_matches(block.expected, done.stdout, block.tolerance)
    assert not output_matches("ran twice\n", run_block(first, tmp_path, tmp_path).stdout)
    doc.write_text("<!-- no-run: -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        collect(doc)
