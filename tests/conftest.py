"""Shared pytest configuration: `gpu` tests skip without CUDA; the integration suites carry the
`trl` and `verl` markers and the Ray launcher suite the `ray` marker, so `make test` leaves them
out by marker whether or not the engine happens to be installed."""

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
