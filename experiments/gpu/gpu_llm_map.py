"""The ~0.1B LLM stress map on one GPU, in a hard wall-clock budget, packed into one tarball.

Runs the shipped ``stress_llm_gpu`` experiment (the ``base100m`` preset on 2-digit addition:
DAPO, ERC off / (0.95, 1.05), steps per rollout {1, 4, 16} x lr {3e-5, 3e-4}) with every run in
its own process on the one CUDA device, stops it when the budget runs out (finished runs are
kept; unfinished ones keep the metrics lines of the steps they did), writes ``erc-gym report``,
and packs the small files of the runs -- ``metrics.jsonl``, ``config.json``, ``run.json``,
``done``, ``error.log``, the report and its figures, never checkpoints or exported models -- into
``OUTDIR/gpu_llm_map.tar.gz``; a default scratch runs folder is deleted afterwards. ``OUTDIR``
also gets ``status.json`` (budget, elapsed, runs done, the device) and a copy of ``report.md``:
three files in all.

Usage (the device machine; erc_gym from the checkout, no install)::

    bash experiments/gpu/gpu_llm_map.sh OUTDIR                  # 240 s budget
    bash experiments/gpu/gpu_llm_map.sh OUTDIR --budget-s 300
    ERC_GYM_GPU_MAP_SHRINK=1 bash experiments/gpu/gpu_llm_map.sh OUTDIR   # CPU smoke test, < 1 min

Afterwards, anywhere: ``tar xzf gpu_llm_map.tar.gz -C runs && erc-gym report runs/stress_llm_gpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from erc_gym.cli_args import CliParser, positive_int

EXPERIMENT = "stress_llm_gpu"
TARBALL = "gpu_llm_map.tar.gz"
#: Files of a run folder (and of the experiment folder) that go into the tarball.
PACKED_SUFFIXES = (".jsonl", ".json", ".md", ".html", ".png", ".svg", ".log")
PACKED_NAMES = ("done",)
#: Seconds of the budget kept for the report and the tarball after the runs are stopped.
RESERVE_S = 30.0
#: The shrunk grid of the CPU smoke test: what replaces the GPU config's settings.
SHRUNK_SETTINGS: dict[str, Any] = {
    "device": "cpu",
    "dtype": "float32",
    "sft_steps": 2,
    "steps": 2,
    "eval_every": 1,
    "num_train": 64,
    "num_eval": 8,
    "prompts_per_step": 4,
    "group_size": 2,
    "max_gen_batches": 1,
    "max_new_tokens": 4,
}
SHRUNK_AXES: dict[str, list[Any]] = {"steps_per_rollout": [1, 4], "lr": [3e-4]}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(
        prog="gpu_llm_map",
        description="Run the stress_llm_gpu grid within a wall-clock budget, write its report "
        "and pack the small result files into OUTDIR/gpu_llm_map.tar.gz.",
    )
    parser.add_argument("outdir", type=Path, help="where the tarball, status.json and report go")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ.get("ERC_GYM_GPU_MAP_BUDGET_S", 240)),
        help="hard wall-clock budget of the whole script in seconds (default 240, or "
        "$ERC_GYM_GPU_MAP_BUDGET_S); the runs get it minus 30 s for report and packing",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="runs folder, kept afterwards (default: a fresh scratch folder in /dev/shm when it "
        "has 40 GB free, else in the temp dir, deleted after packing: the end-of-run checkpoints "
        "take ~1.6 GB per run)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="parallel runs (default: all runs at once)",
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="seeds per cell (default: the config's 1; 2 doubles the runs sharing the GPU)",
    )
    parser.add_argument(
        "--shrink",
        action="store_true",
        default=os.environ.get("ERC_GYM_GPU_MAP_SHRINK", "") not in ("", "0"),
        help="CPU smoke test: tiny model, 2 steps, 4 runs (or $ERC_GYM_GPU_MAP_SHRINK=1)",
    )
    args = parser.parse_args(argv)
    if not args.budget_s > RESERVE_S:
        parser.exit(
            2, f"gpu_llm_map: error: --budget-s must be > {RESERVE_S:g}, got {args.budget_s}\n"
        )
    return args


def experiment_spec(shrink: bool, seeds: int | None = None) -> dict[str, Any]:
    """The shipped ``stress_llm_gpu`` config, or its shrunk CPU version (``shrink``).

    The shrunk version keeps the grid's shape (DAPO, ERC off / on, a steps-per-rollout axis) on
    the ``tiny`` preset with 2 steps, so the whole path runs on a CPU in seconds.

    Args:
        shrink: the CPU smoke-test version.
        seeds: seeds per cell instead of the config's.
    """
    from erc_gym.lab.config import load_experiment

    spec = load_experiment(EXPERIMENT)
    if seeds is not None:
        spec["seeds"] = seeds
    if shrink:
        spec["settings"] = {**spec["settings"], **SHRUNK_SETTINGS}
        spec["envs"] = [{**env, "model": "tiny"} for env in spec["envs"]]
        spec["axes"] = dict(SHRUNK_AXES)
        spec["seeds"] = seeds or 1
        spec["description"] = "SHRUNK CPU smoke test of " + EXPERIMENT
    return spec


def _default_runs_dir() -> Path:
    """Scratch space for the runs: RAM-backed /dev/shm when it is large enough (fast saves)."""
    shm = Path("/dev/shm")
    base = Path(tempfile.gettempdir())
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 40e9:
        base = shm
    return Path(tempfile.mkdtemp(prefix="erc_gym_gpu_map_", dir=base))


def _device_info(shrink: bool) -> dict[str, Any]:
    """torch / CUDA facts, probed in a child process so this one never initialises CUDA."""
    if shrink:
        return {"device": "cpu (shrunk smoke test)"}
    code = (
        "import json, torch; ok = torch.cuda.is_available(); print(json.dumps({"
        "'torch': torch.__version__, 'cuda_available': ok, "
        "'device': torch.cuda.get_device_name(0) if ok else None, "
        "'device_count': torch.cuda.device_count()}))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, ValueError, IndexError) as err:
        return {"probe_error": f"{type(err).__name__}: {err}"}


def run_grid(config: Path, runs: Path, workers: int, timeout_s: float) -> dict[str, Any]:
    """``erc-gym experiment`` in a child process, stopped with SIGTERM at ``timeout_s``.

    The runner stops its workers on SIGTERM (5 s grace, then SIGKILL); metrics lines are
    written per step, so stopped runs keep what they did.
    """
    cmd = [sys.executable, "-m", "erc_gym", "experiment", str(config), "--runs", str(runs)]
    cmd += ["--workers", str(workers), "--no-report", "--no-progress"]
    start = time.monotonic()
    # cwd is not the checkout: ``python -m`` puts cwd first on sys.path, and the checkout's
    # erc_gym/ (without envs/) would shadow the layout that the launcher puts on PYTHONPATH
    proc = subprocess.Popen(cmd, cwd=runs)
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    return {"returncode": rc, "timed_out": timed_out, "grid_s": round(time.monotonic() - start, 1)}


def pack(experiment_dir: Path, tarball: Path) -> int:
    """Pack the small result files below ``experiment_dir`` (no checkpoints, no models).

    Returns the number of files packed. Paths in the archive start with the experiment name, so
    ``tar xzf TARBALL -C runs`` recreates ``runs/<experiment>/...``.
    """
    root = experiment_dir.parent
    files = sorted(
        p
        for p in experiment_dir.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and "model" not in p.relative_to(experiment_dir).parts
        and (p.suffix in PACKED_SUFFIXES or p.name in PACKED_NAMES)
    )
    tmp = tarball.with_name(f".{tarball.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(root)))
    os.replace(tmp, tarball)
    return len(files)


def main(argv: list[str] | None = None) -> int:
    """Run, report, pack; returns 0 when every run finished, 1 otherwise (results packed anyway)."""
    t0 = time.monotonic()
    args = _parse(argv)
    from erc_gym.lab.grid import expand

    args.outdir.mkdir(parents=True, exist_ok=True)
    runs = (args.runs or _default_runs_dir()).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    spec = experiment_spec(args.shrink, args.seeds)
    config = runs / f"{EXPERIMENT}.json"
    config.write_text(json.dumps(spec, indent=2))
    grid = expand(spec)
    status: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "shrunk": args.shrink,
        "budget_s": args.budget_s,
        "runs_dir": str(runs),
        "runs_total": len(grid),
        **_device_info(args.shrink),
    }
    workers = args.workers or len(grid)
    left = args.budget_s - RESERVE_S - (time.monotonic() - t0)
    status |= run_grid(config, runs, workers, max(left, 1.0))
    experiment_dir = runs / EXPERIMENT
    done = [r for r in grid if (r.folder(runs) / "done").exists()]
    status["runs_done"] = len(done)
    status["runs_unfinished"] = [f"{r.variant}/{r.seed}" for r in grid if r not in done]
    try:
        from erc_gym.lab.report import write_report

        report = write_report(experiment_dir)
        shutil.copyfile(report, args.outdir / "report.md")
    except Exception as err:  # the metrics are what matters; a report can be redone from them
        status["report_error"] = f"{type(err).__name__}: {err}"
    status["files_packed"] = pack(experiment_dir, args.outdir / TARBALL)
    if args.runs is None:
        shutil.rmtree(runs, ignore_errors=True)
        status["runs_dir"] += " (deleted after packing)"
    status["elapsed_s"] = round(time.monotonic() - t0, 1)
    (args.outdir / "status.json").write_text(json.dumps(status, indent=2) + "\n")
    print(json.dumps(status, indent=2))
    return 0 if len(done) == len(grid) else 1


if __name__ == "__main__":
    sys.exit(main())
