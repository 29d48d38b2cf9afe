"""Running an experiment: every unfinished run of a grid, in parallel processes, resumable.

:func:`run_experiment` reads a config (:mod:`erc_gym.lab.config`), expands its grid
(:mod:`erc_gym.lab.grid`), refuses run folders made with another config, and hands the runs still
to do to a launcher; :func:`run_one` trains one run folder (:mod:`erc_gym.lab.rundir`) with its
trainer kind (:mod:`erc_gym.lab.kinds`). Running the experiment again skips finished runs and
resumes unfinished ones from their last checkpoint.

Safety off the happy path:

* a run folder whose ``run.json`` differs from the current config is refused before anything
  runs, naming the differing keys (``overwrite=True`` / ``--overwrite`` starts those runs over);
* each run folder is locked (:mod:`filelock`, an OS lock released even when its holder is
  killed) while a process trains it: a second ``erc-gym experiment`` on the same folder skips the
  runs the first holds and says so;
* the local launcher (:class:`LocalLauncher`) gives runs one child process each
  (``multiprocessing``), which dies with the main process (``PR_SET_PDEATHSIG`` on Linux, a
  parent-pid watchdog elsewhere) -- a ``ProcessPoolExecutor`` can neither stop a running task nor
  outlive-proof its workers. Ctrl-C / SIGTERM stops the workers within seconds and raises
  :class:`ExperimentInterrupted`; checkpoints are written atomically, so interrupted runs resume
  from their last one.

What runs (the grid) and how it runs (the launcher) are apart: a :data:`Launcher` is any
callable that runs a list of :class:`~erc_gym.lab.grid.RunSpec` through :func:`run_one` and
reports an :class:`Outcome` (:class:`LocalLauncher` for this machine).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from erc_gym.jsonl import last_value
from erc_gym.lab.config import load_experiment, validate_experiment
from erc_gym.lab.grid import RunSpec, expand
from erc_gym.lab.kinds import get_kind
from erc_gym.lab.rundir import (
    ConfigMismatch,
    RunLocked,
    clear,
    config_diff,
    hold,
    is_done,
    mark_done,
    mismatch_message,
    read_done,
    resolved_config,
    write_config,
    write_error,
    write_json,
)

__all__ = [
    "ExperimentInterrupted",
    "Launcher",
    "LocalLauncher",
    "Outcome",
    "Progress",
    "RunsFailed",
    "attempt",
    "run_experiment",
    "run_one",
    "stopped_by",
]

#: Seconds that stopping workers get after SIGTERM before SIGKILL.
_STOP_GRACE_S = 5.0


class RunsFailed(RuntimeError):
    """Some runs of the grid raised; each one's traceback is in its folder's ``error.log``."""


class ExperimentInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the experiment; unfinished runs resume from their checkpoints.

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        finished: runs of the grid with a ``done`` marker.
        total: runs in the grid.
        stopped: runs that were in progress (resumable).
    """

    def __init__(self, signum: int, finished: int, total: int, stopped: list[Path]) -> None:
        self.signum = signum
        self.finished = finished
        self.total = total
        self.stopped = stopped
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: {finished}/{total} runs finished, {len(stopped)} in progress stopped "
            "at their last checkpoint"
        )


class _SigTerm(KeyboardInterrupt):
    """SIGTERM turned into an exception when runs train in this process (``workers=1``)."""


def run_one(run: RunSpec, root: str | Path, resume: bool = True, overwrite: bool = False) -> Path:
    """Train one run (resuming it when possible) and mark it done; returns its folder.

    Holds the folder's lock while it works. A finished run with the same config is left alone.

    Raises:
        RunLocked: another process trains this run now.
        ConfigMismatch: the folder holds a run of another config and ``overwrite`` is False.
    """
    folder = run.folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    with hold(folder):
        resolved = resolved_config(run)
        diffs = config_diff(folder, resolved)
        if diffs and not overwrite:
            raise ConfigMismatch(
                mismatch_message(folder, diffs) + "; overwrite=True (--overwrite) starts it over"
            )
        if diffs:
            clear(folder)
        if is_done(folder):
            return folder
        write_json(folder / "run.json", resolved)
        write_config(folder, run)
        start = time.perf_counter()
        get_kind(run.kind).train(run, folder, resume, _stop_after())
        write_config(folder, run)
        mark_done(folder, time.perf_counter() - start)
    return folder


def _stop_after() -> int | None:
    """Test hook: ``ERC_GYM_STOP_AFTER=N`` stops every run after N iterations / steps."""
    value = os.environ.get("ERC_GYM_STOP_AFTER")
    return int(value) if value else None


# ---------------------------------------------------------------------------------------------
# Progress within runs: the main process reads the last line of each running run's metrics.


def _budget(run: RunSpec) -> tuple[str, float]:
    """``(metrics key, total)`` of a run's progress counter."""
    return get_kind(run.kind).budget(resolved_config(run)["trainer"])


class Progress:
    """A tqdm bar over the grid in runs, moved by the fraction done of each running run.

    A launcher calls :meth:`refresh` with the runs in progress (it reads the last line of their
    ``metrics.jsonl``), :meth:`run_finished` when one ends and :meth:`write` for messages.
    """

    def __init__(
        self, spec: dict[str, Any], runs: list[RunSpec], root: Path, finished: int
    ) -> None:
        from tqdm import tqdm

        self.root = root
        self.finished = finished
        self.budgets = {id(r): _budget(r) for r in runs}
        self.bar = tqdm(
            total=len(runs),
            initial=finished,
            desc=spec["name"],
            unit="run",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} runs "
            "[{elapsed}<{remaining}]",
            file=sys.stderr,
        )
        self.lock = threading.Lock()

    def refresh(self, running: list[RunSpec]) -> None:
        """Move the bar by the fraction done of each running run."""
        partial = 0.0
        for run in running:
            key, total = self.budgets[id(run)]
            value = last_value(run.folder(self.root) / "metrics.jsonl", key)
            if value is not None and total > 0:
                partial += min(value / total, 0.99)
        with self.lock:
            n = round(self.finished + partial, 2)
            if n != self.bar.n:
                self.bar.n = n
                self.bar.refresh()

    def run_finished(self) -> None:
        """Count one more finished run."""
        with self.lock:
            self.finished += 1

    def write(self, message: str) -> None:
        """Print a line above the bar."""
        with self.lock:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        """Remove the bar."""
        with self.lock:
            self.bar.close()


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress.write(message)
    else:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Worker processes that never outlive the main process.


def _die_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` ends, even if ``parent`` is SIGKILLed."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (linux/prctl.h)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return

    def watchdog() -> None:  # elsewhere: poll the parent (it is reparented when it dies)
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()


def attempt(run: RunSpec, root: str | Path, resume: bool, overwrite: bool) -> tuple[str, str]:
    """:func:`run_one` in a worker (a child process, a cluster task): one torch thread, and the
    result as ``("done" | "locked" | "error" | "unlogged", text)`` (:meth:`Outcome.add` records
    it); an error's traceback goes to the run's ``error.log`` ("unlogged": that file could not be
    written, a full disk, and ``text`` says where the error was raised instead)."""
    import torch

    torch.set_num_threads(1)
    try:
        run_one(run, root, resume, overwrite)
        return "done", ""
    except RunLocked as err:
        return "locked", str(err)
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        cause = write_error(run.folder(root), traceback.format_exc())
        if cause is None:
            return "error", text
        # no file holds the traceback: its innermost frame goes with the error
        frame = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{frame.filename}:{frame.lineno} in {frame.name}"
        return "unlogged", f"{text} (raised at {where}; error.log could not be written: {cause})"


def _worker(run: RunSpec, root: str, resume: bool, overwrite: bool, conn: Any, parent: int) -> None:
    """Child process: one run; reports :func:`attempt`'s result through ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent)
    try:
        conn.send(attempt(run, root, resume, overwrite))
    finally:
        conn.close()


@dataclass
class Outcome:
    """What a launcher reports: the runs that finished, were skipped because another process
    holds them (with the message), failed (with a one-line reason), were stopped by a signal
    (``signum``) or were retried after their worker died (with the number of retries)."""

    finished: list[RunSpec] = field(default_factory=list)
    locked: list[tuple[RunSpec, str]] = field(default_factory=list)
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    stopped: list[RunSpec] = field(default_factory=list)
    signum: int | None = None
    retried: list[tuple[RunSpec, int]] = field(default_factory=list)

    def add(
        self, run: RunSpec, status: str, text: str, root: Path, progress: Progress | None
    ) -> None:
        """Record one run's :func:`attempt` result, and say a skip or a failure."""
        if status == "done":
            self.finished.append(run)
            if progress is not None:
                progress.run_finished()
        elif status == "locked":
            self.locked.append((run, text))
            _say(progress, f"skipped: {text}")
        else:  # "error": the traceback is in error.log; "unlogged": it could not be written
            if status != "unlogged":
                text += f" (traceback in {run.folder(root) / 'error.log'})"
            self.failed.append((run, text))
            _say(progress, f"failed: {run.folder(root)}: {text}")


@contextlib.contextmanager
def _handle_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Install ``handler`` for SIGINT and SIGTERM (main thread only), restore afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _mp_context() -> Any:
    """``fork`` (fast start), unless this process has initialised CUDA: then ``spawn``.

    A forked child cannot use a CUDA context made by its parent ("Cannot re-initialize CUDA in
    forked subprocess"). The runner itself never touches CUDA, so runs on a GPU (``device:
    "cuda"``) each initialise their own context in their child process and share the device;
    spawn covers callers that used CUDA before calling :func:`run_experiment`.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return mp.get_context("spawn")
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()


def _run_in_processes(
    todo: list[RunSpec],
    root: Path,
    resume: bool,
    overwrite: bool,
    workers: int,
    progress: Progress | None,
) -> Outcome:
    """Run ``todo`` in at most ``workers`` child processes; stop them all on SIGINT / SIGTERM."""
    ctx = _mp_context()
    out = Outcome()
    pending = list(todo)
    active: dict[Any, tuple[RunSpec, Any]] = {}  # process -> (run, receiving end)
    forced = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal forced
        if out.signum is None:
            out.signum = signum
            _note_stop(signum)
            return
        forced = True  # a second Ctrl-C: no grace period
        for proc in list(active):
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)

    def reap(proc: Any) -> None:
        run, conn = active.pop(proc)
        proc.join()
        try:
            status, text = conn.recv() if conn.poll() else ("", "")
        except EOFError:  # killed before it could report
            status, text = "", ""
        conn.close()
        if not status:
            status, text = "error", f"worker ended with exit code {proc.exitcode}"
        if out.signum is not None and status in ("error", "unlogged"):
            out.stopped.append(run)
        else:
            out.add(run, status, text, root, progress)

    with _handle_signals(on_signal):
        while (pending or active) and out.signum is None:
            while pending and len(active) < workers:
                run = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker,
                    args=(run, str(root), resume, overwrite, send, os.getpid()),
                    name=f"erc-gym {run.variant}/{run.seed}",
                )
                proc.start()
                send.close()
                active[proc] = (run, recv)
            wait([p.sentinel for p in active], timeout=0.5)
            for proc in [p for p in active if not p.is_alive()]:
                reap(proc)
            if progress is not None:
                progress.refresh([r for r, _ in active.values()])
        if out.signum is not None:  # stop: SIGTERM, a short grace period, then SIGKILL
            for proc in active:
                with contextlib.suppress(OSError):
                    proc.terminate()
            deadline = time.monotonic() + _STOP_GRACE_S
            for proc in list(active):
                proc.join(timeout=0 if forced else max(deadline - time.monotonic(), 0))
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                reap(proc)
    return out


def _run_here(
    todo: list[RunSpec], root: Path, resume: bool, overwrite: bool, progress: Progress | None
) -> Outcome:
    """Run ``todo`` one after another in this process (``workers=1``: easy to debug)."""
    out = Outcome()
    current: list[RunSpec] = []
    stop_polling = threading.Event()

    def poll() -> None:
        while not stop_polling.wait(0.5):
            if progress is not None:
                progress.refresh(list(current))

    def on_term(signum: int, frame: Any) -> None:
        raise _SigTerm()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    import torch

    # one torch thread, as in a worker process: a run's numbers and speed do not depend on
    # --workers (with the default thread count, CartPole runs took ~8x the CPU on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
        # Ctrl-C is a KeyboardInterrupt here whatever the caller had installed (the CLI ignores
        # signals that arrive after the runs, and this function restores its handlers)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for run in todo:
            current[:] = [run]
            try:  # a run that raises is recorded as in a worker process (error.log)
                status, text = attempt(run, root, resume, overwrite)
            except KeyboardInterrupt as err:
                out.signum = signal.SIGTERM if isinstance(err, _SigTerm) else signal.SIGINT
                _note_stop(out.signum)
                out.stopped.append(run)
                break
            out.add(run, status, text, root, progress)
    finally:
        stop_polling.set()
        current.clear()
        torch.set_num_threads(threads)
        if in_main:
            for signum, handler in old.items():
                signal.signal(signum, handler)
    return out


#: How the runs of a grid are run (here in local processes; a cluster launcher is another such
#: callable): called with the runs to do, the runs folder, ``resume``, ``overwrite`` and the
#: progress bar (or None), it trains each with :func:`run_one`, stops them on SIGINT / SIGTERM
#: (recording the signal in ``Outcome.signum``) and returns the :class:`Outcome`.
Launcher = Callable[[list[RunSpec], Path, bool, bool, Progress | None], Outcome]


@dataclass
class LocalLauncher:
    """A :data:`Launcher` on this machine: one run after another in this process (``workers=1``,
    easy to debug), or at most ``workers`` child processes that never outlive this one."""

    workers: int = 1

    def __call__(
        self,
        todo: list[RunSpec],
        root: Path,
        resume: bool,
        overwrite: bool,
        progress: Progress | None,
    ) -> Outcome:
        if self.workers == 1:
            return _run_here(todo, root, resume, overwrite, progress)
        return _run_in_processes(todo, root, resume, overwrite, self.workers, progress)


_stopped_by: int | None = None


def stopped_by() -> int | None:
    """The signal (SIGINT or SIGTERM) that stopped this process's last :func:`run_experiment`,
    or None. Lets a caller's own signal handler tell "the runs were stopped, we are leaving"
    from an ordinary signal."""
    return _stopped_by


def _note_stop(signum: int | None) -> None:
    global _stopped_by
    _stopped_by = signum


#: A grid of more runs than this gets a warning with its size and what it will cost, before the
#: run folders are checked (which alone takes about half a minute at 50,000 runs).
LARGE_GRID = 1000
#: Run folders checked before a large grid's warning, to time the check.
_CHECK_SAMPLE = 50


def _check_folders(
    runs: list[RunSpec], root: Path, name: str, workers: int | None
) -> list[tuple[Path, list[str]]]:
    """``(folder, differences)`` of the runs whose folder holds another config; a grid of more
    than :data:`LARGE_GRID` runs is announced (one line) once the first folders are timed."""
    stale = []
    start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        if diffs := config_diff(run.folder(root), resolved_config(run)):
            stale.append((run.folder(root), diffs))
        if len(runs) > LARGE_GRID and i == min(_CHECK_SAMPLE, len(runs)):
            check_s = (time.perf_counter() - start) / i * len(runs)
            _say(None, _large_grid_warning(runs, root, name, check_s, workers))
    return stale


def _large_grid_warning(
    runs: list[RunSpec], root: Path, name: str, check_s: float, workers: int | None
) -> str:
    """``warning: <name>: a large grid of N runs (V variants x S seeds); checking ... about
    T s; ...``, with the time still to train estimated from the finished runs of a sample
    spread over the grid (their ``done`` markers record their training time)."""
    import statistics

    sample = runs[:: max(1, len(runs) // _CHECK_SAMPLE)]

    variants = len({r.variant for r in runs})
    seeds = len({r.seed for r in runs})
    line = (
        f"warning: {name}: a large grid of {len(runs):,} runs ({variants} variants x {seeds} "
        f"seeds); checking their folders takes about {check_s:.0f} s"
    )
    took = []
    for run in sample:  # the training time that finished runs recorded in their done marker
        with contextlib.suppress(OSError, ValueError):
            if (marker := read_done(run.folder(root))) is not None:
                took.append(marker.seconds)
    n_workers = workers or os.cpu_count() or 1
    if took:
        rest = round(len(runs) * (1 - len(took) / len(sample)))
        median = statistics.median(took)
        hours = median * rest / n_workers / 3600
        line += (
            f"; {len(took)} of {len(sample)} runs sampled have finished, in a median {median:.0f} "
            f"s: about {hours:.1f} h for the other ~{rest:,} on {n_workers} workers"
        )
    else:
        line += "; the progress bar estimates the time once the first runs finish"
    return line + "; Ctrl-C stops it, the same command resumes"


def run_experiment(
    name: str | dict[str, Any],
    root: str | Path = "runs",
    *,
    workers: int | None = None,
    resume: bool = True,
    progress: bool = True,
    seeds: int | None = None,
    overwrite: bool = False,
    launcher: Launcher | None = None,
) -> list[Path]:
    """Run every unfinished run of an experiment; returns all run folders of the grid.

    Args:
        name: a shipped experiment name, a config path, or a config dict (checked against the
            schema either way).
        root: the runs folder.
        workers: parallel processes of the default launcher (default: the number of cores, at
            most the runs to do); ``1`` runs in this process.
        resume: resume unfinished runs from their checkpoints (False: restart them).
        progress: a tqdm bar over the grid (on stderr), moving within runs.
        seeds: override the config's number of seeds.
        overwrite: start over the runs whose folder holds another config (their outputs are
            deleted); otherwise such folders are refused before anything runs.
        launcher: how the runs are run (default: :class:`LocalLauncher` with ``workers``).

    Raises:
        ConfigError: the config does not fit the schema.
        ConfigMismatch: run folders of another config exist (and ``overwrite`` is False).
        ExperimentInterrupted: SIGINT or SIGTERM; unfinished runs resume on the next call.
        RunsFailed: runs raised (the others still ran); tracebacks in ``<run>/error.log``.
    """
    _note_stop(None)
    if isinstance(name, str):
        spec = load_experiment(name)
        if seeds is not None:
            spec = validate_experiment({**spec, "seeds": seeds}, name)
    else:
        raw = dict(name) if seeds is None else {**name, "seeds": seeds}
        spec = validate_experiment(raw, str(name.get("name", "config")))
    root = Path(root)
    runs = expand(spec)
    stale = _check_folders(runs, root, spec["name"], workers)
    if stale and not overwrite:
        folder, diffs = stale[0]
        raise ConfigMismatch(
            f"{len(stale)} run folder(s) were made with another config, e.g. "
            f"{mismatch_message(folder, diffs)}; --overwrite (overwrite=True) starts them over "
            "and deletes their outputs, or choose another runs folder"
        )
    (root / spec["name"]).mkdir(parents=True, exist_ok=True)
    write_json(root / spec["name"] / "experiment.json", spec)
    restart = {f for f, _ in stale}
    todo = [r for r in runs if r.folder(root) in restart or not is_done(r.folder(root))]
    if launcher is None:
        launcher = LocalLauncher(max(1, min(workers or os.cpu_count() or 1, len(todo) or 1)))
    bar = Progress(spec, runs, root, len(runs) - len(todo)) if progress else None
    try:
        out = launcher(todo, root, resume, overwrite, bar)
    finally:
        if bar is not None:
            bar.close()
    if out.signum is not None:
        finished = sum(is_done(r.folder(root)) for r in runs)
        raise ExperimentInterrupted(
            out.signum, finished, len(runs), [r.folder(root) for r in out.stopped]
        )
    if out.retried:
        shown = ", ".join(f"{r.folder(root)} ({n}x)" for r, n in out.retried[:3])
        _say(
            None,
            f"{len(out.retried)} run(s) retried after their worker died, each resuming from its "
            f"last checkpoint: {shown}{', ...' if len(out.retried) > 3 else ''}",
        )
    if out.locked:
        _say(
            None,
            f"{len(out.locked)} run(s) skipped: another erc-gym process holds them; run the "
            "same command again when it has finished to include them",
        )
    if out.failed:
        run, text = out.failed[0]
        raise RunsFailed(
            f"{len(out.failed)} of {len(todo)} runs failed, e.g. {run.folder(root)}: {text}"
        )
    return [r.folder(root) for r in runs]
