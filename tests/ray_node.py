"""A Ray worker node on 127.0.0.1 for the Ray launcher tests, optionally blind to one folder.

``python tests/ray_node.py GCS_ADDRESS NUM_CPUS [HIDDEN]`` joins the cluster whose head runs at
``GCS_ADDRESS`` and stays until its stdin closes (or SIGTERM), then stops the node's processes.
With ``HIDDEN`` (run it under ``unshare --mount --propagation private``) an empty tmpfs covers that
folder on this node only: a runs folder there is one that this node cannot see, as on a cluster
whose nodes do not share it.

Why not ``ray start --address``: the tests keep Ray on loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
=0``, which makes every Ray process bind 127.0.0.1), and in that mode ``ray start`` refuses to add
a second node; this is what ``ray.cluster_utils.Cluster.add_node`` does, in a process of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def main() -> None:
    gcs, cpus, *hidden = sys.argv[1:]
    if hidden:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", hidden[0]], check=True)
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=gcs,
        num_cpus=int(cpus),
        num_gpus=0,
        object_store_memory=80 * 2**20,
        include_log_monitor=False,
        node_manager_port=0,
        min_worker_port=0,
        max_worker_port=0,
    )
    params.dashboard_agent_listen_port = None
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(node.unique_id, flush=True)
    try:
        sys.stdin.read()
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)


if __name__ == "__main__":
    main()
