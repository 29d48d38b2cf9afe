"""`make setup` picks a CPU torch build on CPU machines and PyPI's CUDA build with nvidia-smi
and still installs where PyTorch's index is unreachable (this CI)."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(tmp_path: Path, path_dirs: list[Path], *args: str) -> str:
    env = {**os.environ, "PATH": os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"])}
    return subprocess.run(
        ["make", "-n", "-C", str(ROOT), "setup", f"VENV={tmp_path / 'venv'}", *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout


def test_cpu_machine_takes_the_cpu_wheel_from_pytorchs_index(tmp_path):
    lines = (ROOT / "constraints-cpu.txt").read_text().splitlines()
    (pin,) = [ln.split("==")[1] for ln in lines if ln.startswith("torch==")]
    out = _dry_run(tmp_path, [])  # no nvidia-smi on PATH
    assert f'"torch=={pin}+cpu" --index-url https://download.pytorch.org/whl/cpu' in out
    assert "-c constraints-cpu.txt" in out
    assert "not reachable" in out  # the offline fallback is part of the recipe


def test_nvidia_smi_selects_pypis_cuda_build(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    out = _dry_run(tmp_path, [bin_dir])
    assert "+cpu" not in out and "constraints-cpu.txt" not in out
    assert "CUDA build" in out
    assert "+cpu" in _dry_run(tmp_path, [bin_dir], "TORCH=cpu")  # explicit override


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            seen.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.mark.slow
@pytest.mark.parametrize("index", ["reachable", "unreachable"])
def test_make_setup_from_a_clean_clone(tmp_path, index):
    """Minutes: a full install into a fresh venv of a clone of this repository's HEAD."""
    wheels = sorted(Path(os.environ.get("PIP_FIND_LINKS", "/opt/wheels")).glob("torch-*+cpu-*.whl"))
    if index == "reachable" and not wheels:
        pytest.skip("no local +cpu torch wheel to serve as a stand-in PyTorch index")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    args = ["make", "-C", str(clone), "setup"]
    server = None
    if index == "reachable":
        # a PEP 503 simple index on localhost standing in for download.pytorch.org/whl/cpu
        site = tmp_path / "site"
        (site / "simple" / "torch").mkdir(parents=True)
        (site / "files").mkdir()
        links = []
        for w in wheels:
            (site / "files" / w.name).symlink_to(w)
            links.append(f'<a href="/files/{w.name.replace("+", "%2B")}">{w.name}</a>')
        (site / "simple" / "torch" / "index.html").write_text("\n".join(links))
        server, seen = _serve(site)
        args.append(f"TORCH_CPU_INDEX=http://127.0.0.1:{server.server_port}/simple")
    try:
        out = subprocess.run([*args, "TORCH=cpu"], capture_output=True, text=True, timeout=1800)
    finally:
        if server is not None:
            server.shutdown()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    py = clone / ".venv" / "bin" / "python"
    version = subprocess.run(
        [str(py), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version.endswith("+cpu")
    listed = subprocess.run(
        [str(py), "-m", "pip", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "nvidia" not in listed.lower()
    if index == "reachable":
        assert "torch: CPU build" in out.stdout
        assert any(p.startswith("/files/torch-") for p in seen), seen
    else:
        assert "not reachable" in out.stdout
