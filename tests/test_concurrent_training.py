"""Two `stresnet train` runs at once on a host where another Ray runs already: each starts its own
local Ray, both finish, and neither prints tracebacks or Ray error lines that are not errors.

The other Ray is a `ray start --head` of this test's own (own temp folder, ports and token), stopped
by terminating its process: never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_ray_multinode import RayNodes, free_port
from tiny_run import make_tiny_shards, tiny_config

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture
def another_ray():
    """A standing Ray on the host (what another user or job may run), one CPU."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayother-", dir="/tmp"))  # short: socket paths
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    log = (temp_dir / "head.log").open("wb")
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=1",
         "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp_dir}",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    head.log_path = temp_dir / "head.log"
    try:
        yield head
    finally:
        RayNodes.stop(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_two_trainings_at_once_on_one_host_both_finish_quietly(tmp_path, another_ray):
    make_tiny_shards(tmp_path)  # one shard set; the runs differ in name
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = []
    for name in ("first", "second"):
        config = tiny_config(tmp_path / name, f"dataset.root={tmp_path / 'videos'}",
                             f"shards.output={tmp_path / 'shards'}", f"data.shards={tmp_path / 'shards'}",
                             "train.epochs=2", "train.validate_every=2", f"train.run_name={name}")
        log = (tmp_path / f"{name}.log").open("w")
        runs.append((name, log, subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "train", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)))
    for name, log, process in runs:
        code = process.wait(timeout=900)
        log.close()
        output = (tmp_path / f"{name}.log").read_text()
        assert code == 0, output[-4000:]
        assert "steps:      2" in output
        # "max_restarts": Ray Train's preemption watcher; "multiple active Ray instances": Ray
        # Train's placement-group cleaner looking for "the" Ray on the host (cluster/train.py
        # connect_ray gives both what they need).
        for noise in ("max_restarts", " ERROR ", "Traceback", "multiple active Ray instances"):
            assert noise not in output, f"{name}: {noise!r} in\n{output[-4000:]}"
    assert another_ray.poll() is None, \
        f"the other Ray on the host stopped:\n{another_ray.log_path.read_text()[-3000:]}"
