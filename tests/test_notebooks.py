"""The notebooks under docs/notebooks: stored without outputs, and they run from top to bottom.

The run is what CI checks: a fresh kernel executes every cell headless (nbclient) and any cell
that raises fails the test. The notebook's widget cells also assert that their first drawing
succeeded, since ipywidgets shows an exception raised inside a slider callback instead of
raising it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from queue import Empty
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))
#: Longest a cell may run (each takes seconds; a stuck kernel fails instead of hanging CI).
CELL_TIMEOUT = 300


def test_there_are_notebooks():
    assert NOTEBOOKS, "docs/notebooks/*.ipynb is empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    """Outputs (images, widget state) belong to a run, not to git."""
    raw = json.loads(path.read_text())
    assert "widgets" not in raw.get("metadata", {}), f"{path.name}: saved widget state"
    for i, cell in enumerate(raw["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name} cell {i}: clear its outputs"
        assert cell.get("execution_count") is None, f"{path.name} cell {i}: execution count"


def _poll_shell_in_slices(client: Any, slice_s: float = 1.0) -> None:
    """Make the kernel client's shell channel wait for a reply in slices of ``slice_s``.

    With ipywidgets, nbclient sometimes receives a cell's execute reply only when its wait times
    out (jupyter/nbclient issue 312): the cell then looks as slow as the timeout although it
    finished. Waiting in short slices up to the same deadline keeps the timeout a real timeout.
    """
    channel = client.kc.shell_channel
    get_msg = channel.get_msg

    async def sliced(timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = slice_s if deadline is None else min(slice_s, deadline - time.monotonic())
            try:
                return await get_msg(timeout=max(left, 0.0))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = sliced


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    with client.setup_kernel():
        _poll_shell_in_slices(client)
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError on an error
    images = sum(
        1
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "display_data"
    )
    assert images, "the notebook displayed nothing"
