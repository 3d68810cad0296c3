"""The slurm/ scripts on a real one-node SLURM (Debian's slurm-wlm, installed by the fixture).

Submitted exactly as a user would (``sbatch slurm/train_ucf101.sh``, ``sbatch
slurm/make_shards.sh``) with sbatch options that fit the test cluster (2 nodes of 1 CPU, both on
this machine, no GPU) and a tiny synthetic config; only what the scripts write is checked. Those tests are slow; the first
few check the scripts' own logic in seconds, outside SLURM, with the job variables set by hand.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, install_slurm
from tiny_run import REPO, loss_history, make_tiny_shards, mlflow_run_id, planned_steps

from pipelines import shard_format as fmt
from stresnet.config import dump_config, load_config

SCRIPTS = REPO / "slurm"
# What the test cluster offers instead of the scripts' GPU defaults: a Ray head on one node, a
# Ray worker on the other (through srun), one Ray Train worker on each.
SMALL = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def run_script(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A slurm/ script outside SLURM, with only the given job variables set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_ray_ports_follow_the_job_id_and_the_address_the_interface():
    done = run_script("ray_node.sh", "address", SLURM_JOB_ID="1234", RAY_NODE_IFACE="lo")
    assert done.stdout.strip() == "127.0.0.1:22340", done.stderr  # 20000 + 10 * (1234 % 1000)
    done = run_script("ray_node.sh", "address", SLURM_JOB_ID="1234", RAY_PORT_BASE="40000",
                      RAY_NODE_IFACE="lo")
    assert done.stdout.strip() == "127.0.0.1:40000"
    done = run_script("ray_node.sh", "address", SLURM_JOB_ID="1", RAY_NODE_IFACE="nosuchif0")
    assert done.returncode != 0 and "nosuchif0" in done.stderr


def test_ray_gets_the_gpus_slurm_allocated():
    assert run_script("ray_node.sh", "gpus", SLURM_JOB_ID="1", SLURM_GPUS_ON_NODE="4").stdout == "4\n"
    assert run_script("ray_node.sh", "gpus", SLURM_JOB_ID="1", CUDA_VISIBLE_DEVICES="0,3").stdout == "2\n"
    assert run_script("ray_node.sh", "gpus", SLURM_JOB_ID="1").stdout == "0\n"


def test_training_script_rejects_a_bad_config_before_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {depth: 34}\n")
    done = run_script("ray_train.sh", "train.epochs=2", SLURM_JOB_ID="987654", CONFIG=str(bad),
                      STRESNET_DIR=str(REPO))
    assert done.returncode == 2
    assert f"{bad}: model.depth: got 34 (int), expected one of [50, 101, 152]" in done.stderr
    assert not Path("/tmp/ray-987654").exists()


def test_shard_array_must_be_zero_based():
    done = run_script("make_shards.sh", SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_MIN="1",
                      SLURM_ARRAY_TASK_MAX="3", SLURM_ARRAY_TASK_COUNT="3", STRESNET_DIR=str(REPO))
    assert done.returncode == 2
    assert "--array must be 0-2" in done.stderr


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    install_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


def submit_training(slurm: SlurmCluster, tiny: Path, workdir: Path, *overrides: str) -> int:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    return slurm.sbatch([*SMALL, str(SCRIPTS / "train_ucf101.sh"), *overrides], cwd=workdir,
                        env={"CONFIG": str(tiny), "STRESNET_DIR": str(REPO)})


def job_log(workdir: Path, job_id: int) -> str:
    return (workdir / "logs" / f"stresnet-ucf101-{job_id}.out").read_text()


def assert_no_ray_left(job_id: int) -> None:
    """The job stopped its Ray processes and removed its temp folder."""
    assert not Path(f"/tmp/ray-{job_id}").exists()
    found = subprocess.run(["pgrep", "-f", f"/tmp/ray-{job_id}"], capture_output=True, text=True)
    assert found.stdout == "", f"Ray processes of job {job_id} still running: {found.stdout}"


@pytest.mark.slow
@pytest.mark.slurm
def test_training_job_completes(slurm, tiny, tmp_path):
    job_id = submit_training(slurm, tiny, tmp_path)
    job = slurm.wait(job_id, timeout=400)[0]
    log = job_log(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "cluster.ray_nodes: 2 Ray nodes alive" in log
    assert "training finished with status 0" in log
    steps = planned_steps(log)
    assert f"steps:      {steps}" in log
    # No run name in tiny.yaml: the job names it, so that a requeue finds it again.
    run = tiny.parent / "runs" / f"stresnet-ucf101-{job_id}"
    assert (run / f"checkpoint_{steps:07d}" / "model.pt").is_file()
    assert sorted(loss_history(tiny, mlflow_run_id(log))) == list(range(1, steps + 1))
    assert_no_ray_left(job_id)


@pytest.mark.slow
@pytest.mark.slurm
def test_warning_signal_checkpoints_and_requeues(slurm, tiny, tmp_path):
    job_id = submit_training(slurm, tiny, tmp_path)
    logs = tmp_path / "logs" / f"stresnet-ucf101-{job_id}.out"
    slurm.wait_until(job_id, lambda job: logs.exists() and "(total 3/" in logs.read_text(), timeout=300)
    # What SLURM sends 300 s before the time limit (--signal=B:USR1@300), now.
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job_id)])
    job = slurm.wait(job_id, timeout=500)[0]
    log = logs.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    steps = planned_steps(log)
    stopped = re.search(r"stopped on request at step (\d+)", log)
    assert stopped and 3 <= int(stopped.group(1)) < steps, log[-3000:]
    assert f"requeueing job {job_id}" in log
    assert f"job {job_id} (restart 1)" in log
    assert f"resumed at step {stopped.group(1)}" in log
    assert f"steps:      {steps}" in log  # as many as an uninterrupted run
    run = tiny.parent / "runs" / f"stresnet-ucf101-{job_id}"
    assert (run / f"checkpoint_{steps:07d}" / "model.pt").is_file()
    # One MLflow run across both attempts, with every step logged.
    assert sorted(loss_history(tiny, mlflow_run_id(log))) == list(range(1, steps + 1))
    assert_no_ray_left(job_id)


def read_samples(shards: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in the manifest's shards: key -> {member suffix: bytes}."""
    manifest = fmt.read_manifest(shards)
    samples: dict[str, dict[str, bytes]] = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(shards / shard["name"]) as tar:
                for member in tar.getmembers():
                    key, _, suffix = member.name.partition(".")
                    samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


@pytest.mark.slow
@pytest.mark.slurm
def test_shard_array_matches_one_process(slurm, tiny, tmp_path):
    (tmp_path / "logs").mkdir()
    out = tmp_path / "shards"
    # The videos already exist (the tiny fixture made them); the tasks only read them.
    config = tmp_path / "array.yaml"
    dump_config(load_config(tiny, [f"shards.output={out}"]), config)
    array_id = slurm.sbatch(
        ["--array=0-2", "--cpus-per-task=1", "--time=10", str(SCRIPTS / "make_shards.sh")],
        cwd=tmp_path, env={"CONFIG": str(config), "STRESNET_DIR": str(REPO)},
    )
    tasks = slurm.wait(array_id, timeout=300)
    first_log = (tmp_path / "logs" / f"stresnet-shards-{array_id}_0.out").read_text()
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 3, first_log
    finalize_id = int(re.search(r"finalize job (\d+)", first_log).group(1))
    finalize = slurm.wait(finalize_id, timeout=120)[0]
    assert finalize["JobState"] == "COMPLETED", [p.read_text() for p in (tmp_path / "logs").glob("*finalize*")]
    written = {(split, partition) for split in ("train", "test") for partition in range(3)
               if (out / fmt.shard_name(split, partition, 0)).is_file()}
    assert len(written) == 6  # every task wrote its partition of both splits
    single = read_samples(tiny.parent / "shards")
    assert read_samples(out) == single
    assert len(single) == fmt.read_manifest(out)["splits"]["train"]["samples"] + \
        fmt.read_manifest(out)["splits"]["test"]["samples"]
