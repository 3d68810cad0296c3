"""The stop request: "checkpoint after the current step and stop", carried by Ray's KV store.

A run is asked to stop before a time limit or a preemption. The request used to be a file in the
run folder, but on NFS a file's creation can stay invisible to another node for up to
``acdirmax`` (60 s by default), a fifth of SLURM's 300 s warning. Ray's internal key-value store
lives in the head's GCS, which every process of the cluster already talks to: a request put
there is seen by world rank 0 at its next step.

Who raises it:

- the driver's SIGUSR1/SIGTERM handler (``cluster/train.py``; ``slurm/ray_train.sh`` forwards
  SLURM's warning signal to it);
- ``python -m cluster.stop_request --address IP:PORT --run NAME``, from any node of the cluster:
  ``slurm/ray_node.sh`` runs it when SLURM's preemption SIGTERM reaches a Ray node.

The request outlives the process that raised it (a request raised while the driver starts is
honoured at the first step) and is cleared by the driver when its training returns.
"""

from __future__ import annotations

import argparse
import signal
import sys

NAMESPACE = b"stresnet"


def _key(run_name: str) -> bytes:
    return f"stop_requested/{run_name}".encode()


def request_stop(run_name: str, address: str | None = None) -> None:
    """Ask the run ``run_name`` to checkpoint and stop.

    Through this process's Ray connection when it has one (the driver), else through a GCS
    client for ``address`` (no driver is registered: nothing to start, quick to fail).
    """
    _client(address).internal_kv_put(_key(run_name), b"1", True, NAMESPACE)


def stop_requested(run_name: str) -> bool:
    """Whether a stop was requested for ``run_name`` (called by world rank 0 every step)."""
    return _client(None).internal_kv_get(_key(run_name), NAMESPACE) is not None


def clear_stop_request(run_name: str) -> None:
    """Forget the request once the run has acted on it (or ended another way)."""
    _client(None).internal_kv_del(_key(run_name), False, NAMESPACE)


def install_stop_signals(run_name: str) -> None:
    """In the driver (main thread, after ``ray.init``, which installs its own SIGTERM handler):
    SIGUSR1 and SIGTERM raise the stop request (SIGTERM: what SLURM sends a job it preempts or
    cancels, and ``kill``'s default); a second SIGTERM ends the driver at once
    (``slurm/ray_train.sh`` sends two when the run cannot stop by itself, e.g. after losing a
    node). SIGUSR1 never ends it: the batch script sends one along with SLURM's SIGTERM.
    """
    terms = 0

    def on_signal(signum: int, frame) -> None:
        nonlocal terms
        if signum == signal.SIGTERM:
            terms += 1
            if terms > 1:
                raise SystemExit(128 + signum)
        try:
            request_stop(run_name)
        except Exception as err:  # noqa: BLE001 - the GCS is gone: nothing left to stop cleanly
            raise SystemExit(f"stop requested ({signal.Signals(signum).name}) but Ray is unreachable: {err}")
        sys.__stdout__.write(f"[train] stop requested ({signal.Signals(signum).name}): checkpointing "
                             f"after the current step\n")
        sys.__stdout__.flush()

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def _client(address: str | None):
    if address is None:
        import ray
        from ray._private.worker import global_worker

        if not ray.is_initialized():
            raise RuntimeError("cluster.stop_request: not connected to Ray and no address given")
        return global_worker.gcs_client
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.stop_request",
                                     description="Ask a run to checkpoint after its current step and stop.")
    parser.add_argument("--address", required=True, help="the head's GCS address, ip:port")
    parser.add_argument("--run", required=True, help="the run name (train.run_name)")
    args = parser.parse_args(argv)
    try:
        request_stop(args.run, args.address)
    except Exception as err:  # noqa: BLE001 - any failure: say so, the caller decides
        print(f"cluster.stop_request: could not reach {args.address}: {err}", file=sys.stderr)
        return 1
    print(f"cluster.stop_request: stop requested for run {args.run} at {args.address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
