"""Shared pytest configuration: `gpu` tests skip without CUDA; the integration suites carry the
`trl` and `verl` markers and the Ray launcher suite the `ray` marker, so `make test` leaves them
out by marker whether or not the engine happens to be installed; a full disk to write to."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# CI runs the property tests with a fixed seed so a submission's result does not depend on luck;
# locally they explore new examples every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


#: Test modules (by name prefix) of each suite that runs in an environment of its own -> its marker.
SUITES = {"test_trl": pytest.mark.trl, "test_verl": pytest.mark.verl, "test_ray": pytest.mark.ray}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        for prefix, marker in SUITES.items():
            if module.startswith(prefix):
                item.add_marker(marker)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)``: a new folder with a tmpfs of that size (``"2m"``) mounted on it, unmounted
    after the test. Mounting needs root (or CAP_SYS_ADMIN); the test is skipped where it is not
    allowed (tests that must run everywhere patch the write instead)."""
    import shutil
    import subprocess

    mounted = []

    def mount(size):
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def full_disk(tmpfs):
    """A folder on a 2 MB tmpfs whose free space is filled to a few KB: a full disk, for real."""
    import shutil

    folder = tmpfs("2m")
    with open(folder / ".filler", "wb") as f:  # leave 16 KB: small files still fit
        f.write(b"\0" * (shutil.disk_usage(folder).free - 16 * 1024))
    return folder


@pytest.fixture
def read_only(tmpfs):
    """``make(source=None)``: a folder on a tmpfs holding a copy of ``source``, then remounted
    read-only: a read-only runs folder, for real (root ignores file modes, a mount does not)."""
    import shutil
    import subprocess

    folder = tmpfs("8m")

    def make(source=None):
        if source is not None:
            shutil.copytree(source, folder, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return folder

    return make
