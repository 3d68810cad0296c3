"""Wait until a Ray cluster has a given number of live nodes (used by ``slurm/ray_train.sh``).

    python -m cluster.ray_nodes --address IP:PORT --nodes N [--timeout S] [--watch-pid PID] [--plan]

Exits 0 once N nodes are alive, 1 on timeout or when a watched process (the head's
``ray start --block``, the ``srun`` of the worker nodes) died first, so a job whose Ray did not
come up fails at once or within the timeout instead of waiting forever. Starting the training
before every node joined would make Ray Train wait for the missing GPUs anyway, but with no
message saying why.

With ``--plan`` it prints the Ray Train workers the joined cluster has room for, as config
overrides (:func:`worker_plan`): from the nodes' actual resources, so allocations with
``--gpus=N``, ``--gpus-per-task`` or nodes with different GPU counts come out right.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_plan(nodes: list[dict]) -> list[str]:
    """Config overrides for the Ray Train workers of a cluster (``ray.nodes()`` entries).

    Without GPUs: none (the config's ``cluster.num_workers`` and ``cluster.cpus_per_worker``
    apply). With GPUs: one worker per GPU of every live node, and each worker gets the CPUs of
    its node shared among that node's GPUs (the smallest share over the nodes, so every worker
    fits), all but one of them for its data loader, so that a GPU job uses the CPUs SLURM
    allocated (``--cpus-per-task``) instead of one per worker (Ray then also sets
    ``OMP_NUM_THREADS`` to it).
    """
    gpu_nodes = [node["Resources"] for node in nodes
                 if node.get("Alive") and node["Resources"].get("GPU", 0) >= 1]
    if not gpu_nodes:
        return []
    workers = sum(int(resources["GPU"]) for resources in gpu_nodes)
    cpus = max(1, min(int(resources.get("CPU", 0)) // int(resources["GPU"]) for resources in gpu_nodes))
    return ["cluster.use_gpu=true", f"cluster.num_workers={workers}",
            f"cluster.cpus_per_worker={cpus}", f"data.loader_workers={max(1, cpus - 1)}"]


def wait_for_nodes(address: str, nodes: int, timeout: float, watch_pids: tuple[int, ...] = (),
                   plan: list[str] | None = None) -> int:
    """Connect to ``address`` (retrying while its GCS starts) and wait for ``nodes`` live nodes.

    Gives up as soon as one of ``watch_pids`` (the processes running the nodes) exits. Returns
    the number of live nodes (and fills ``plan`` with :func:`worker_plan`); raises
    ``TimeoutError`` (or ``RuntimeError`` when a watched process died) with a message that says
    how many nodes joined.
    """
    import ray

    deadline = time.monotonic() + timeout
    count = 0
    while True:
        for pid in watch_pids:
            if not alive(pid):
                raise RuntimeError(f"a Ray node's process (pid {pid}) exited before the cluster was up")
        try:
            if not ray.is_initialized():
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            found = ray.nodes()
            count = sum(1 for node in found if node["Alive"])
            if count >= nodes:
                if plan is not None:
                    plan.extend(worker_plan(found))
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
    parser.add_argument("--watch-pid", type=int, action="append", default=[],
                        help="give up when this process (a node's) exits; may be repeated")
    parser.add_argument("--plan", action="store_true",
                        help="print the Ray Train workers' config overrides (see worker_plan)")
    args = parser.parse_args(argv)
    plan: list[str] = []
    try:
        count = wait_for_nodes(args.address, args.nodes, args.timeout, tuple(args.watch_pid), plan)
    except (TimeoutError, RuntimeError) as err:
        print(f"cluster.ray_nodes: {err}", file=sys.stderr)
        return 1
    # On stderr: stdout is the plan, for the calling script.
    print(f"cluster.ray_nodes: {count} Ray nodes alive at {args.address}", file=sys.stderr)
    if args.plan:
        print(" ".join(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
