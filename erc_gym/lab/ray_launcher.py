"""Running a grid on a Ray cluster: one Ray task per run (``erc-gym experiment --launcher ray``).

:class:`RayLauncher` is a :data:`~erc_gym.lab.runner.Launcher`: the runner expands the grid and
refuses run folders made with another config as for a local grid; the launcher runs each run still
to do as one Ray task that calls :func:`~erc_gym.lab.runner.run_one` on the node it lands on.
What it takes on the cluster is its kind's request (``Kind.resources``: one CPU, a GPU for an
``llm`` run on ``cuda``) updated with the config's ``"resources"``. Ray is an optional extra
(``pip install 'erc-gym[ray]'``); this module imports it only when a launcher runs. The setup of a
cluster, and what happens on faults: ``docs/cluster.md``.

Every node trains in the same runs folder, so it must be one folder that every node sees at the
same path (a shared filesystem). Before anything trains, the launcher writes a probe file there
and a task on every node that could take a run reads it and writes one back, which the driver
reads; a node that fails is named in one line (:class:`ClusterError`) and nothing trains. Each run
task checks the probe again on the node it lands on (nodes that joined later), so a node that
does not see the folder never trains a run into a folder of its own.

The run-folder protocol (:mod:`erc_gym.lab.rundir`) is the one of a local grid: a run's lock is
held by the process that trains it, finished runs have a ``done`` marker and checkpoints are
replaced atomically. So a second command on the same folder, a rerun, or local and Ray commands
mixed, never train a run twice (on a network filesystem the lock needs working ``flock``: NFSv4,
Lustre, CephFS, GPFS).

Faults: a run whose worker process (or node) dies is submitted again, resuming from its last
checkpoint, at most ``retries`` times; the summary names the runs retried. The launcher retries
rather than Ray (``max_retries=0``) so that it can count and say the retries. A run that raises
(bad settings, NaN) is reported with its error, as locally, and the other runs go on.

Ctrl-C or SIGTERM on the driver cancels every task (``ray.cancel(force=True)`` ends the worker
process of a running one), then waits until no process holds the lock of a stopped run -- the
lock lives in the shared folder, so that is proof from any node that its trainer is gone -- and
the runner raises :class:`~erc_gym.lab.runner.ExperimentInterrupted` (the CLI prints the command
that resumes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erc_gym.lab.grid import RunSpec
from erc_gym.lab.kinds import BUILTIN_KINDS, get_kind, register_kind
from erc_gym.lab.rundir import RunLocked, hold, resolved_config, write_error
from erc_gym.lab.runner import (
    Outcome,
    Progress,
    _handle_signals,
    _note_stop,
    _say,
    attempt,
)

__all__ = ["INSTALL_HINT", "ClusterError", "RayLauncher", "run_resources"]

#: What ``--launcher ray`` says without Ray.
INSTALL_HINT = "the ray launcher needs Ray: pip install 'erc-gym[ray]'"

#: Seconds the driver waits for every node to answer the runs-folder probe (a node may first
#: have to start a worker process).
PROBE_TIMEOUT_S = 120.0
#: Seconds the driver waits, after cancelling, for the trainers of the stopped runs to be gone.
STOP_TIMEOUT_S = 10.0
#: Seconds to reach the head's address before ``ray.init`` (which retries for minutes).
CONNECT_TIMEOUT_S = 10.0


class ClusterError(RuntimeError):
    """The grid cannot run on the cluster (one line): Ray missing, the cluster unreachable, the
    runs folder not visible from a node, or resources that no node has. Nothing was trained."""


def run_resources(run: RunSpec, override: dict[str, float] | None = None) -> dict[str, float]:
    """What one run asks the cluster for: its kind's request updated with ``override`` (the
    config's ``"resources"``), in Ray's resource names (``CPU``, ``GPU``, ``memory``, custom)."""
    trainer = resolved_config(run)["trainer"]
    return {**get_kind(run.kind).resources(trainer), **(override or {})}


def _config_resources(root: Path, experiment: str) -> dict[str, float] | None:
    """The ``"resources"`` of the config, as the runner recorded it in ``experiment.json``."""
    try:
        spec = json.loads((root / experiment / "experiment.json").read_text())
    except (OSError, ValueError):
        return None
    resources = spec.get("resources") if isinstance(spec, dict) else None
    return resources if isinstance(resources, dict) else None


def _task_options(request: dict[str, float]) -> dict[str, Any]:
    """``ray.remote`` options of a resource request: ``num_cpus``, ``num_gpus``, ``memory`` and
    custom ``resources``."""
    custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU", "memory")}
    options: dict[str, Any] = {
        "num_cpus": request.get("CPU", 0),
        "num_gpus": request.get("GPU", 0),
    }
    if "memory" in request:
        options["memory"] = int(request["memory"])
    if custom:
        options["resources"] = custom
    return options


def _fits(request: dict[str, float], node: dict[str, Any]) -> bool:
    have = node.get("Resources", {})
    return all(have.get(name, 0.0) >= amount for name, amount in request.items() if amount > 0)


def _node_name(node_id: str, ip: str) -> str:
    return f"{ip} (node {node_id[:12]})"


# ---------------------------------------------------------------------------------------------
# What runs on the nodes. Plain functions, made remote when a launcher runs.


def _sees_probe(probe: str, token: str) -> str:
    """``""`` when this node reads ``token`` in the driver's probe file, else what it sees."""
    try:
        seen = Path(probe).read_text()
    except FileNotFoundError:
        return f"no file {probe} there"
    except OSError as err:
        return f"cannot read {probe} ({err.strerror or err})"
    return "" if seen == token else f"{probe} holds another launch's probe"


def _probe_task(probe: str, token: str) -> tuple[str, str, str]:
    """On one node: read the driver's probe file, write this node's answer beside it.

    Returns ``(node id, node ip, problem)``, ``problem`` empty when the node sees the folder.
    """
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    ip = ray.util.get_node_ip_address()
    problem = _sees_probe(probe, token)
    if not problem:
        try:
            Path(f"{probe}.{node_id}").write_text(token)
        except OSError as err:
            problem = f"cannot write in it ({err.strerror or err})"
    return node_id, ip, problem


def _run_task(
    run: RunSpec,
    root: str,
    resume: bool,
    overwrite: bool,
    probe: str,
    token: str,
    kind: Any,
) -> tuple[str, str]:
    """One run on the node this task landed on: :func:`~erc_gym.lab.runner.attempt`, after
    checking that this node sees the runs folder (``("unshared", reason)`` if not)."""
    problem = _sees_probe(probe, token)
    if problem:
        import ray

        node = _node_name(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
        return "unshared", f"the runs folder {root} is not visible from {node}: {problem}"
    if kind is not None:  # a kind registered in the driver (register_kind), not built in
        register_kind(kind)
    return attempt(run, root, resume, overwrite)


# ---------------------------------------------------------------------------------------------
# The driver.


def _check_reachable(address: str | None) -> None:
    """A quick TCP connection to the head's ``host:port`` (``ray.init`` retries an address where
    nothing answers for minutes); Ray Client addresses (``ray://``) are left to Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or "://" in address or address in ("auto", "local"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: give the head's HOST:PORT, e.g. 10.0.0.1:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address}: {reason}; start its head with "
            "`ray start --head` (docs/cluster.md)"
        ) from None


@contextlib.contextmanager
def _connected(address: str | None) -> Iterator[Any]:
    """``ray`` connected to the cluster at ``address`` (None: ``RAY_ADDRESS``, else a cluster
    started on this machine by ``ray start``, else a new local Ray instance); disconnects
    afterwards unless the caller had connected. Ray's own SIGTERM handler is not left behind."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    _check_reachable(address)
    in_main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        with warnings.catch_warnings():  # Ray's notes on its own future defaults
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as err:  # ConnectionError, ValueError (a malformed address), RuntimeError
        with contextlib.suppress(Exception):
            ray.shutdown()
        where = f"at {address}" if address else "(RAY_ADDRESS, or one on this machine)"
        reason = " ".join(str(err).split())[:300]
        raise ClusterError(f"cannot connect to the Ray cluster {where}: {reason}") from None
    try:
        yield ray
    finally:
        ray.shutdown()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _probe_file(root: Path) -> Iterator[tuple[str, str]]:
    """A probe file with a fresh token in the runs folder, removed with the nodes' answers."""
    token = uuid.uuid4().hex
    probe = root / f".erc-gym-probe-{token}"
    try:
        probe.write_text(token)
    except OSError as err:
        raise ClusterError(f"cannot write in the runs folder {root}: {err.strerror}") from None
    try:
        yield str(probe), token
    finally:
        for path in root.glob(f"{probe.name}*"):
            with contextlib.suppress(OSError):
                path.unlink()


def _check_nodes(ray: Any, requests: list[dict[str, float]]) -> list[dict[str, Any]]:
    """The alive nodes that can take a run; raises :class:`ClusterError` when a request fits no
    node (Ray would wait for such a node forever)."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    for request in requests:
        if not any(_fits(request, n) for n in alive):
            largest = max(alive, key=lambda n: n["Resources"].get("CPU", 0.0), default=None)
            have = {
                k: v
                for k, v in (largest or {}).get("Resources", {}).items()
                if k in ("CPU", "GPU") or not (k.startswith("node:") or k.endswith("memory"))
            }
            raise ClusterError(
                f"a run needs {request} but no node of the Ray cluster has that much (the "
                f'largest has {have}); change "resources" in the config or add such a node'
            )
    return [n for n in alive if any(_fits(r, n) for r in requests)]


def _probe_nodes(ray: Any, root: Path, probe: str, token: str, nodes: list[dict]) -> None:
    """One probe task on each node: it reads the driver's probe file and writes its answer,
    which the driver then reads. Raises :class:`ClusterError` naming the first node that fails."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(_probe_task)
    refs = {
        remote.options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            max_retries=1,
            name="erc-gym probe",
        ).remote(probe, token): n
        for n in nodes
    }
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    for ref in late:
        node = refs[ref]
        ray.cancel(ref, force=True)
        name = _node_name(node["NodeID"], node["NodeManagerAddress"])
        raise ClusterError(
            f"Ray node {name} did not answer within {PROBE_TIMEOUT_S:.0f} s (the check that it "
            f"sees the runs folder {root})"
        )
    for ref in ready:
        node = refs[ref]
        name = _node_name(node["NodeID"], node["NodeManagerAddress"])
        try:
            node_id, _, problem = ray.get(ref)
        except ray.exceptions.RayError as err:  # e.g. erc-gym not installed on that node
            cause = " ".join(str(getattr(err, "cause", None) or err).split())[:200]
            raise ClusterError(
                f"Ray node {name} cannot run erc-gym ({cause}); install erc-gym (the same "
                "version) on every node"
            ) from None
        if not problem and _sees_probe(f"{probe}.{node_id}", token):
            problem = "its file written there does not reach the driver"
        if problem:
            raise ClusterError(
                f"the runs folder {root} is not visible from Ray node {name}: {problem}; every "
                "node must see the runs folder at the same path (a shared filesystem, see "
                "docs/cluster.md)"
            )


def _one_line(err: BaseException, limit: int = 300) -> str:
    return " ".join(str(err).split())[:limit]


def _record(run: RunSpec, root: Path, text: str) -> None:
    """Write why a run failed outside its trainer to its ``error.log`` (as a traceback is)."""
    with contextlib.suppress(OSError):
        run.folder(root).mkdir(parents=True, exist_ok=True)
    write_error(run.folder(root), text.rstrip() + "\n")


def _wait_stopped(root: Path, runs: list[RunSpec], timeout: float) -> list[RunSpec]:
    """Wait until no process holds the lock of these runs; returns those still held."""
    held = list(runs)
    deadline = time.monotonic() + timeout
    while held:
        still = []
        for run in held:
            if not run.folder(root).is_dir():  # the task never started
                continue
            try:
                with hold(run.folder(root)):
                    pass
            except RunLocked:
                still.append(run)
        held = still
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return held


@dataclass
class RayLauncher:
    """A :data:`~erc_gym.lab.runner.Launcher` on a Ray cluster: one Ray task per run.

    Pass it to :func:`~erc_gym.lab.runner.run_experiment` (``launcher=RayLauncher(...)``), or use
    ``erc-gym experiment NAME --launcher ray [--address ADDR]``. Each run takes its kind's
    resources updated with the config's ``"resources"`` (read from the ``experiment.json`` that
    the runner writes).

    Args:
        address: the cluster (``host:port`` of the head, as ``ray start --head`` prints it);
            None: ``RAY_ADDRESS``, else a cluster started on this machine, else a new local Ray
            instance. An already connected ``ray`` is used as it is.
        retries: how often a run whose worker or node died is started again (from its
            checkpoint) before it counts as failed.

    Raises:
        ClusterError: Ray is not installed (the message says how to install it).
    """

    address: str | None = None
    retries: int = 3

    def __post_init__(self) -> None:
        if importlib.util.find_spec("ray") is None:
            raise ClusterError(INSTALL_HINT)
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")

    def __call__(
        self,
        todo: list[RunSpec],
        root: Path,
        resume: bool,
        overwrite: bool,
        progress: Progress | None,
    ) -> Outcome:
        """Run ``todo`` on the cluster (see the module docstring).

        Raises:
            ClusterError: the cluster cannot be reached, a node does not see the runs folder, or
                no node has the resources of a run; nothing was trained.
        """
        if not todo:
            return Outcome()
        root = Path(root).resolve()  # a relative path means another folder on another node
        override = {e: _config_resources(root, e) for e in {run.experiment for run in todo}}
        requests = {id(run): run_resources(run, override[run.experiment]) for run in todo}
        with _connected(self.address) as ray:
            distinct = [dict(t) for t in {tuple(sorted(r.items())) for r in requests.values()}]
            nodes = _check_nodes(ray, distinct)
            with _probe_file(root) as (probe, token):
                _probe_nodes(ray, root, probe, token, nodes)
                grid = _Grid(ray, root, resume, overwrite, progress, self.retries, probe, token)
                return grid.run(todo, requests)


class _Grid:
    """One launch on the cluster: the tasks in flight, their retries and the outcome."""

    def __init__(
        self,
        ray: Any,
        root: Path,
        resume: bool,
        overwrite: bool,
        progress: Progress | None,
        retries: int,
        probe: str,
        token: str,
    ) -> None:
        self.ray = ray
        self.root = root
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.retries = retries
        self.probe = probe
        self.token = token
        self.remote = ray.remote(_run_task)
        self.pending: dict[Any, tuple[RunSpec, int]] = {}  # task ref -> (run, retries so far)
        self.retried: dict[int, int] = {}  # id(run) -> retries
        self.out = Outcome()

    def run(self, todo: list[RunSpec], requests: dict[int, dict[str, float]]) -> Outcome:
        """Submit every run, settle tasks as they end, cancel them all on SIGINT / SIGTERM."""
        self.requests = requests
        with _handle_signals(self.on_signal):
            for run in todo:
                self.submit(run, 0)
            while self.pending and self.out.signum is None:
                refs = list(self.pending)
                ready, _ = self.ray.wait(
                    refs, num_returns=len(refs), timeout=0.5, fetch_local=False
                )
                for ref in ready:
                    self.settle(ref)
                if self.progress is not None:
                    self.progress.refresh([run for run, _ in self.pending.values()])
            if self.out.signum is not None:
                self.cancel()
        self.out.retried = [(r, self.retried[id(r)]) for r in todo if id(r) in self.retried]
        return self.out

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.out.signum is None:
            self.out.signum = signum
            _note_stop(signum)

    def submit(self, run: RunSpec, tries: int) -> None:
        """One Ray task for ``run``; a retry (``tries`` > 0) resumes what the first attempt
        started, whatever ``resume`` and ``overwrite`` said."""
        kind = None if run.kind in BUILTIN_KINDS else get_kind(run.kind)
        options = _task_options(self.requests[id(run)])
        options |= {"max_retries": 0, "name": f"erc-gym {run.variant}/{run.seed}"}
        first = tries == 0
        resume, overwrite = self.resume or not first, self.overwrite and first
        args = (run, str(self.root), resume, overwrite, self.probe, self.token, kind)
        self.pending[self.remote.options(**options).remote(*args)] = (run, tries)

    def settle(self, ref: Any) -> None:
        """Record a finished task: its run's result, or a retry when its worker died."""
        errors = self.ray.exceptions
        run, tries = self.pending.pop(ref)
        try:
            status, text = self.ray.get(ref)
        except errors.RayTaskError as err:  # raised outside attempt(): not a fault of the node
            status, text = "failed", _one_line(err.cause or err)
            _record(run, self.root, str(err))
        except (errors.TaskUnschedulableError, errors.RuntimeEnvSetupError) as err:
            status, text = "failed", f"{type(err).__name__}: {_one_line(err)}"
            _record(run, self.root, text)
        except errors.RayError as err:  # its worker process or its node died
            if tries < self.retries:
                self.retried[id(run)] = tries + 1
                _say(
                    self.progress,
                    f"retrying {run.folder(self.root)} from its last checkpoint "
                    f"({tries + 1}/{self.retries}): its Ray worker died ({type(err).__name__})",
                )
                self.submit(run, tries + 1)
                return
            status = "failed"
            text = f"its Ray worker died {tries + 1} times (last: {type(err).__name__})"
            _record(run, self.root, f"{text}\n{err}")
        if status == "unshared":
            status = "failed"
            _record(run, self.root, text)
        self.out.add(run, "error" if status == "failed" else status, text, self.root, self.progress)

    def cancel(self) -> None:
        """Cancel every task, record which runs finished anyway and which stopped, and wait
        until the stopped runs' trainers are gone."""
        refs = list(self.pending)
        for ref in refs:
            self.ray.cancel(ref, force=True)
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
        for ref in refs:
            run, _ = self.pending[ref]
            if ref in ready:
                with contextlib.suppress(self.ray.exceptions.RayError):
                    if self.ray.get(ref)[0] == "done":  # it finished before the cancel came
                        self.out.add(run, "done", "", self.root, self.progress)
                        continue
            self.out.stopped.append(run)
        for run in _wait_stopped(self.root, self.out.stopped, STOP_TIMEOUT_S):
            _say(self.progress, f"warning: {run.folder(self.root)} is still trained on the cluster")
