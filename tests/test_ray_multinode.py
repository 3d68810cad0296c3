"""Multi-node Ray on one machine: a head and a worker node started with ``ray start``, the
training driver joining them through ``cluster.address``.

Each node has one CPU and each of the two Ray Train workers needs one, so the workers run on
different nodes. The nodes run in the foreground (``ray start --block``) as this test's child
processes with their own ports, temp folder and auth token, and are stopped by terminating
those processes: never ``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tiny_run import REPO, loss_history, make_tiny_shards, mlflow_run_id, planned_steps

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class RayNodes:
    """A head and worker nodes on this machine, one CPU each."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        self.started = 0
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",  # a token of its own: no other process may join or connect
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stopping a node: no 30 s drain
        }
        # Ray replaces 127.0.0.1 by the machine's address: use that one from the start.
        ip = subprocess.run([sys.executable, "-c", "import ray.util; print(ray.util.get_node_ip_address())"],
                            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        self.address = f"{ip}:{free_port()}"
        self.head = self._start(["--head", f"--port={self.address.split(':')[1]}", "--include-dashboard=false"])
        self.worker = self.start_worker()

    def _start(self, role_args: list[str]) -> subprocess.Popen:
        worker_ports = 20000 + 100 * secrets.randbelow(300)
        args = [
            str(RAY), "start", "--block", *role_args, f"--node-ip-address={self.address.split(':')[0]}",
            "--num-cpus=1", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 99}",
            "--disable-usage-stats",
        ]
        self.started += 1
        with open(self.temp_dir / f"node-{self.started}.log", "wb") as log:
            return subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def start_worker(self) -> subprocess.Popen:
        return self._start([f"--address={self.address}"])

    def wait_for(self, nodes: int) -> None:
        """Block until ``nodes`` nodes are alive (the command slurm/ray_train.sh uses)."""
        try:
            subprocess.run(
                [sys.executable, "-m", "cluster.ray_nodes", "--address", self.address, "--nodes",
                 str(nodes), "--timeout", "120", "--watch-pid", str(self.head.pid)],
                env=self.env, check=True, timeout=240,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            logs = {p.name: p.read_text()[-2000:] for p in sorted(self.temp_dir.glob("node-*.log"))}
            pytest.fail(f"the Ray nodes did not come up ({err}); their output: {logs}")

    @staticmethod
    def stop(*processes: subprocess.Popen) -> None:
        """SIGTERM (ray start --block then stops its own Ray processes), SIGKILL after 60 s."""
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def nodes():
    # A short temp dir: Ray's socket paths must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="raymn-", dir="/tmp"))
    cluster = None
    try:
        cluster = RayNodes(temp_dir)
        cluster.wait_for(2)
        yield cluster
    finally:
        if cluster is not None:
            RayNodes.stop(cluster.worker, cluster.head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_driver(tiny: Path, nodes: RayNodes, run_name: str, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.train", "--config", str(tiny),
         f"cluster.address={nodes.address}", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
         f"train.run_name={run_name}"],
        env=nodes.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
    )


def finish(driver: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    """Wait for the driver (killing it on timeout: a hang fails the test, it does not block CI)."""
    try:
        driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait(timeout=30)
        pytest.fail(f"the training did not finish within {timeout:.0f}s:\n{log.read_text()[-3000:]}")
    return log.read_text()


def test_training_across_two_nodes_survives_losing_one(tiny, nodes, tmp_path):
    """Two workers on two nodes; the worker node dies mid-run; the run resumes and completes."""
    log = tmp_path / "driver.log"
    driver = start_driver(tiny, nodes, "node-lost", log)
    try:
        deadline = time.monotonic() + 300
        while "(total 3/" not in log.read_text():  # mid-run, after a checkpoint
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not reach step 3"
            time.sleep(0.5)
        # The node dies (SIGKILL; its Ray processes share its fate). A SIGTERM would instead
        # drain it gracefully and let the workers finish first.
        nodes.worker.kill()
        nodes.worker.wait(timeout=30)
        # A replacement node joins (as SLURM or an autoscaler would bring one); Ray Train restarts
        # the worker group on it from the latest checkpoint.
        nodes.worker = nodes.start_worker()
        output = finish(driver, log)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
    assert driver.returncode == 0, output[-3000:]
    assert "resumed at step" in output, output[-3000:]
    steps = planned_steps(output)
    assert f"steps:      {steps}" in output, output[-3000:]
    assert (tiny.parent / "runs" / "node-lost" / f"checkpoint_{steps:07d}" / "model.pt").is_file()
    # Every step was logged (the ones redone after the checkpoint once more).
    assert sorted(loss_history(tiny, mlflow_run_id(output))) == list(range(1, steps + 1))
