"""A Ray cluster of several nodes on this machine for tests/distributed.rs (ray.cluster_utils.Cluster):
a head with no CPU for tasks and N worker nodes with their own CPUs, all under a private temporary
directory. Run with the Ray virtual environment's python:

    ray_test_cluster.py [--nodes 2] [--cpus 1]

Prints `ADDRESS host:port`, then `NODE <node id>` per worker node, then `READY`. Reads commands on
stdin: `remove <node id or prefix>` (the node's processes are stopped: its workers die with it;
answers `REMOVED <id>`), `add` (answers `NODE <id>`). At end of input (or `quit`), or SIGTERM, the
cluster is shut down and the directory removed."""

import argparse
import os
import shutil
import signal
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=1)
    args = ap.parse_args()
    # Ray keeps its sockets and logs, and the cluster's address file, under RAY_TMPDIR: a private one
    # keeps this cluster away from any other Ray on the machine (short: socket paths are limited).
    tmp = tempfile.mkdtemp(prefix="rdt-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = os.path.join(tmp, "ray")
    os.makedirs(temp_dir)

    from ray.cluster_utils import Cluster

    cluster = None

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        node_args = dict(temp_dir=temp_dir, object_store_memory=80 * 1024 * 1024, include_dashboard=False)
        cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, **node_args))
        nodes = [cluster.add_node(num_cpus=args.cpus, **node_args) for _ in range(args.nodes)]
        cluster.wait_for_nodes()
        print(f"ADDRESS {cluster.address}", flush=True)
        for n in nodes:
            print(f"NODE {n.node_id}", flush=True)
        print("READY", flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "quit":
                break
            if cmd[0] == "remove" and len(cmd) == 2:
                match = [n for n in nodes if n.node_id.startswith(cmd[1])]
                if len(match) != 1:
                    print(f"ERROR no single node {cmd[1]}", flush=True)
                    continue
                cluster.remove_node(match[0])
                nodes.remove(match[0])
                print(f"REMOVED {match[0].node_id}", flush=True)
            elif cmd[0] == "add":
                n = cluster.add_node(num_cpus=args.cpus, **node_args)
                cluster.wait_for_nodes()
                nodes.append(n)
                print(f"NODE {n.node_id}", flush=True)
            else:
                print(f"ERROR unknown command {line.strip()!r}", flush=True)
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
