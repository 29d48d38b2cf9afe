"""A real headless browser (Debian's chromium) renders a report: its figures load, its table is
there. Slow (a browser start and ``erc-gym experiment quick`` with one seed); skipped where
chromium is not installed (``apt-get install chromium``).

The check a person does by looking at the screenshot is approximated by counting pixels of two
colours: the line colour of the curves figure and the darkest colour of the heat map (viridis),
which a figure that failed to load does not show.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from erc_gym.cli import main

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: tab:orange (the curves of the last variant, drawn on top) and viridis at 0 (the heat map).
FIGURE_COLOURS = ((255, 127, 14), (68, 1, 84))


def _screenshot(url: str, out: Path, tmp: Path, size: str = "1280,1800") -> np.ndarray:
    from PIL import Image

    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--window-size={size}",
            "--virtual-time-budget=5000",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)


def _pixels_of(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(image - np.array(colour)).sum(axis=-1) < 40).sum())


def _dom(url: str, tmp: Path) -> str:
    profile = tmp / "profile-dom"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--dump-dom", url],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_html_renders_its_figures_and_table(tmp_path, capsys):
    # the README's main job with one seed per variant (PPO, PPO + ERC)
    main(["experiment", "quick", "--seeds", "1", "--runs", str(tmp_path / "runs"), "--no-progress"])
    report = tmp_path / "runs" / "quick" / "report.html"
    assert report.exists()
    image = _screenshot(report.as_uri(), tmp_path / "report.png", tmp_path)
    for colour in FIGURE_COLOURS:  # the curves and the heat map are drawn: both PNGs loaded
        assert _pixels_of(image, colour) > 200, f"no pixels of {colour}: a figure did not load"
    dom = _dom(report.as_uri(), tmp_path)
    assert dom.count("<img") >= 2 and "<table" in dom and "V4096-ppo-erc0.95-1.05" in dom
    # the check sees a missing figure: without the PNGs neither colour is drawn
    for png in (report.parent / "figures").glob("*.png"):
        png.unlink()
    broken = _screenshot(report.as_uri(), tmp_path / "broken.png", tmp_path)
    assert all(_pixels_of(broken, colour) < 50 for colour in FIGURE_COLOURS)
