"""`ray job submit` against a standing Ray started the way docs/cluster.md section 8 says.

Token authentication (`RAY_AUTH_MODE=token`, `ray get-auth-token --generate` writing the token to
`~/.ray/auth_token`: here a home folder of the test's own), the dashboard (the job API) on
127.0.0.1, the venv's `python` first on the PATH, the tiny config with absolute paths and
`cluster.address=auto`, the checkout uploaded with `--working-dir`. The job must succeed and leave
its MLflow run and its checkpoint. The head runs in the foreground (`ray start --block`) as this
test's child and is stopped by terminating it: never `ray stop`, which would stop every Ray on
the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_ray_multinode import RayNodes, free_port
from tiny_run import REPO, make_tiny_shards, mlflow_run_id, tiny_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # the venv's bin: `source .venv/bin/activate` puts it first


def checkout_copy(folder: Path) -> Path:
    """The checkout's files as a clone has them (tracked and new, nothing git ignores)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


def test_the_tiny_config_submitted_with_ray_job_submit_trains_and_tracks(tmp_path):
    make_tiny_shards(tmp_path)
    config = tiny_config(tmp_path, "train.epochs=2", "train.validate_every=2",
                         "train.run_name=submitted")
    checkout = checkout_copy(tmp_path / "checkout")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               VIRTUAL_ENV=str(BIN.parent), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=120)
    assert (home / ".ray" / "auth_token").is_file()

    temp_dir = Path(tempfile.mkdtemp(prefix="rayjob-", dir="/tmp"))  # short: socket paths
    dashboard = f"http://127.0.0.1:{free_port()}"
    log = (temp_dir / "head.log").open("wb")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=checkout)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", dashboard], env=env,
                             capture_output=True, timeout=120).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, \
                f"the job API did not come up:\n{(temp_dir / 'head.log').read_text()[-3000:]}"
            time.sleep(3)
        done = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
             "python", "-m", "cluster.train", "--config", str(config), "cluster.address=auto"],
            env=env, cwd=checkout, capture_output=True, text=True, timeout=900)
    finally:
        RayNodes.stop(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in output, output[-4000:]
    assert "Traceback" not in output, output[-4000:]

    checkpoint = Path(next(line.split(":", 1)[1].strip() for line in output.splitlines()
                           if line.startswith("checkpoint:")))
    assert checkpoint.parent.parent == tmp_path / "runs" and (checkpoint / "model.pt").is_file()
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(mlflow_run_id(output))
    assert run.info.status == "FINISHED" and run.info.run_name == "submitted"
