"""Wait until a Ray cluster has a given number of live nodes (used by ``slurm/ray_train.sh``).

    python -m cluster.ray_nodes --address IP:PORT --nodes N [--timeout S] [--watch-pid PID]

Exits 0 once N nodes are alive, 1 on timeout or when the watched process (the head's
``ray start --block``) died first, so a job whose Ray did not come up fails within the timeout
instead of waiting forever. Starting the training before every node joined would make Ray Train
wait for the missing GPUs anyway, but with no message saying why.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_nodes(address: str, nodes: int, timeout: float, watch_pid: int | None = None) -> int:
    """Connect to ``address`` (retrying while its GCS starts) and wait for ``nodes`` live nodes.

    Returns the number of live nodes; raises ``TimeoutError`` (or ``RuntimeError`` when
    ``watch_pid`` died) with a message that says how many nodes joined.
    """
    import ray

    deadline = time.monotonic() + timeout
    count = 0
    while True:
        if not alive(watch_pid):
            raise RuntimeError(f"the Ray head (pid {watch_pid}) exited before the cluster was up")
        try:
            if not ray.is_initialized():
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            count = sum(1 for node in ray.nodes() if node["Alive"])
            if count >= nodes:
                ray.shutdown()
                return count
        except ConnectionError:
            pass  # the head's GCS is not up yet
        if time.monotonic() > deadline:
            ray.shutdown()
            raise TimeoutError(f"{count} of {nodes} Ray nodes joined {address} within {timeout:.0f}s")
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ray_nodes", description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the head's GCS address, ip:port")
    parser.add_argument("--nodes", type=int, required=True, help="live nodes to wait for")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--watch-pid", type=int, help="give up when this process (the head) exits")
    args = parser.parse_args(argv)
    try:
        count = wait_for_nodes(args.address, args.nodes, args.timeout, args.watch_pid)
    except (TimeoutError, RuntimeError) as err:
        print(f"cluster.ray_nodes: {err}", file=sys.stderr)
        return 1
    print(f"cluster.ray_nodes: {count} Ray nodes alive at {args.address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
