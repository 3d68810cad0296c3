"""The stop request ("checkpoint after the current step and stop") through Ray's KV store.

One local Ray: the request raised by another process (what a Ray node does on SLURM's
preemption SIGTERM, slurm/ray_node.sh) is seen by a Ray worker (where world rank 0 polls it) and
only for its own run; clearing it forgets it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.stop_request import clear_stop_request, stop_requested


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False,
             logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_a_stop_request_from_another_process_reaches_the_workers(local_ray):
    import ray

    assert not stop_requested("run-a")
    done = subprocess.run([sys.executable, "-m", "cluster.stop_request", "--address", local_ray,
                           "--run", "run-a"], env=os.environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "stop requested for run run-a" in done.stdout
    poll = ray.remote(num_cpus=0)(stop_requested)
    assert ray.get([poll.remote("run-a"), poll.remote("run-b")]) == [True, False]
    clear_stop_request("run-a")
    assert not ray.get(poll.remote("run-a"))


def test_the_driver_takes_sigterm_as_a_stop_request_and_a_second_one_as_the_end(local_ray):
    import signal

    from cluster.stop_request import install_stop_signals

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        install_stop_signals("run-c")
        os.kill(os.getpid(), signal.SIGUSR1)  # the batch script's, along with SLURM's SIGTERM
        assert stop_requested("run-c")
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested("run-c")
        with pytest.raises(SystemExit) as ended:
            os.kill(os.getpid(), signal.SIGTERM)
        assert ended.value.code == 128 + signal.SIGTERM
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear_stop_request("run-c")
