"""The slurm/ scripts on a real one-node SLURM (Debian's slurm-wlm, installed by the fixture).

Submitted exactly as a user would (``sbatch slurm/train_ucf101.sh``, ``sbatch
slurm/make_shards.sh``) with sbatch options that fit the test cluster (2 nodes of 1 CPU, both on
this machine, no GPU) and a tiny synthetic config; only what the scripts write is checked. Those tests are slow; the first
few check the scripts' own logic in seconds, outside SLURM, with the job variables set by hand.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tarfile
import time as clock
from datetime import datetime, time, timezone
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, install_slurm
from tiny_run import REPO, loss_history, make_tiny_shards, mlflow_run_id, planned_steps

from pipelines import shard_format as fmt
from cluster.config import dump_config, load_config

SCRIPTS = REPO / "slurm"
# What the test cluster offers instead of the scripts' GPU defaults: a Ray head on one node, a
# Ray worker on the other (through srun), one Ray Train worker on each.
SMALL = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=500", "--time=15"]


def run_script(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A slurm/ script outside SLURM, with only the given job variables set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_ray_ports_follow_the_job_id_and_the_address_the_interface():
    # The loopback interface, named explicitly, is accepted (a one-node job).
    done = run_script("ray_node.sh", "address", SLURM_JOB_ID="1234", RAY_NODE_IFACE="lo")
    assert done.stdout.strip() == "127.0.0.1:26510", done.stderr  # 20000 + 15 * (1234 % 800)
    done = run_script("ray_node.sh", "address", SLURM_JOB_ID="1234", RAY_PORT_BASE="30000",
                      RAY_NODE_IFACE="lo")
    assert done.stdout.strip() == "127.0.0.1:30000"
    done = run_script("ray_node.sh", "address", SLURM_JOB_ID="1", RAY_NODE_IFACE="nosuchif0")
    assert done.returncode != 0 and "nosuchif0" in done.stderr


def job_ports(job_id: int, **env: str) -> dict[str, int]:
    done = run_script("ray_node.sh", "ports", SLURM_JOB_ID=str(job_id), **env)
    assert done.returncode == 0, done.stderr
    return {name: int(port) for name, port in (line.split("=") for line in done.stdout.split())}


def test_every_ray_port_comes_from_one_base_below_the_ephemeral_range():
    ports = job_ports(1234)
    # Ray's fixed defaults (GCS 6379, client server 10001, dashboard 8265, agent 52365) and
    # the ones it would pick itself: all set, all distinct, in one block below 32768.
    assert {"gcs", "client_server", "dashboard", "head_agent", "worker_agent", "head_node_manager",
            "worker_object_manager", "head_runtime_env"} <= set(ports)
    assert sorted(ports.values()) == list(range(26510, 26510 + len(ports)))
    assert all(1024 <= port < 32768 for job in range(0, 5000, 97) for port in job_ports(job).values())
    # RAY_PORT_BASE moves all of them.
    assert sorted(job_ports(1234, RAY_PORT_BASE="25000").values()) == list(range(25000, 25000 + len(ports)))


def test_jobs_150_ids_apart_share_no_port():
    # They used to share their worker port ranges (30000 + 200 * (id % 150)).
    for job in (1234, 0, 799):
        assert not set(job_ports(job).values()) & set(job_ports(job + 150).values())
        assert not set(job_ports(job).values()) & set(job_ports(job + 1).values())


def test_a_port_base_that_reaches_the_ephemeral_range_is_refused():
    for base in ("32760", "40000", "80", "lots"):
        done = run_script("ray_node.sh", "ports", SLURM_JOB_ID="1", RAY_PORT_BASE=base)
        assert done.returncode == 2 and f"RAY_PORT_BASE={base}: expected 1024..32753" in done.stderr


def test_a_loopback_head_address_is_refused_with_a_hint():
    """A node without a default route: Ray falls back to the host name, i.e. 127.0.x.x."""
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs `unshare --net` (root) for a network without a default route")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    done = subprocess.run(["unshare", "--net", "bash", str(SCRIPTS / "ray_node.sh"), "address"],
                          env={**clean, "SLURM_JOB_ID": "1"}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert "loopback address 127." in done.stderr and "set RAY_NODE_IFACE" in done.stderr


def test_ray_memory_follows_the_job_limit():
    def memory(**env: str) -> list[str]:
        return run_script("ray_node.sh", "memory", SLURM_JOB_ID="1", **env).stdout.split()

    mib = 1024 * 1024
    # --mem=1000 (MiB per node): object store 30%, the rest for tasks, not the machine's RAM.
    assert memory(SLURM_MEM_PER_NODE="1000") == [f"--memory={1000 * mib * 7 // 10}",
                                                  f"--object-store-memory={1000 * mib * 3 // 10}"]
    # --mem-per-cpu=100 with 4 CPUs on this node.
    assert memory(SLURM_MEM_PER_CPU="100", SLURM_CPUS_ON_NODE="4") == [
        f"--memory={400 * mib * 7 // 10}", f"--object-store-memory={400 * mib * 3 // 10}"]
    assert memory(SLURM_MEM_PER_NODE="0") == []  # --mem=0: the whole node, Ray's own sizing
    assert memory() == []
    for wrapper in ("train_ucf101.sh", "train_hmdb51.sh"):
        assert re.search(r"^#SBATCH --mem=\d+G$", (SCRIPTS / wrapper).read_text(), re.MULTILINE)


def ray_node(resources: dict[str, float], alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": resources}


def test_gpu_workers_come_from_the_joined_cluster():
    from cluster.ray_nodes import worker_plan

    # --gpus-per-node=4 --cpus-per-task=32 on 2 nodes: 8 workers, 8 CPUs each, 7 for loading.
    assert worker_plan([ray_node({"CPU": 32, "GPU": 4}), ray_node({"CPU": 32, "GPU": 4})]) == [
        "cluster.use_gpu=true", "cluster.num_workers=8", "cluster.cpus_per_worker=8",
        "data.loader_workers=7"]
    # --gpus=4 spread 3 + 1 over two nodes (not "head GPUs x nodes" = 6): every worker must fit,
    # so the smaller share of CPUs per GPU.
    assert worker_plan([ray_node({"CPU": 24, "GPU": 3}), ray_node({"CPU": 16, "GPU": 1})]) == [
        "cluster.use_gpu=true", "cluster.num_workers=4", "cluster.cpus_per_worker=8",
        "data.loader_workers=7"]
    # A node without GPUs and a dead node do not count; one CPU per GPU leaves one loader worker.
    assert worker_plan([ray_node({"CPU": 2, "GPU": 2}), ray_node({"CPU": 64}),
                        ray_node({"CPU": 8, "GPU": 8}, alive=False)]) == [
        "cluster.use_gpu=true", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
        "data.loader_workers=1"]
    # CPU only: the config decides.
    assert worker_plan([ray_node({"CPU": 1}), ray_node({"CPU": 1})]) == []


def fake_slurm_commands(folder: Path, sbatch_exit: int = 0) -> dict[str, str]:
    """An `sbatch` that records its arguments, and a venv whose `stresnet` records its own."""
    bin_dir, venv_bin = folder / "bin", folder / "venv" / "bin"
    for path, status in ((bin_dir / "sbatch", sbatch_exit), (venv_bin / "stresnet", 0)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{folder}/{path.name}.args"\n'
                        f'echo 4242\nexit {status}\n')
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(folder / "venv")}


ARRAY_TASK_0 = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1",
                "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_NAME": "shards"}


def test_finalize_job_gets_the_array_account_partition_and_qos(tmp_path):
    env = fake_slurm_commands(tmp_path)
    done = run_script("make_shards.sh", **ARRAY_TASK_0, **env, STRESNET_DIR=str(REPO),
                      SLURM_JOB_ACCOUNT="proj42", SLURM_JOB_PARTITION="cpu", SLURM_JOB_QOS="long")
    assert done.returncode == 0, done.stderr
    submitted = (tmp_path / "sbatch.args").read_text().splitlines()
    assert {"--account=proj42", "--partition=cpu", "--qos=long", "--dependency=afterok:77"} <= set(submitted)
    assert "finalize job 4242" in done.stdout
    assert "shards.partition=0" in (tmp_path / "stresnet.args").read_text().splitlines()


def test_a_failed_finalize_submission_does_not_stop_the_task(tmp_path):
    env = fake_slurm_commands(tmp_path, sbatch_exit=1)
    done = run_script("make_shards.sh", **ARRAY_TASK_0, **env, STRESNET_DIR=str(REPO))
    assert done.returncode == 0, done.stderr
    assert "could not submit the finalize job" in done.stderr and "--finalize" in done.stderr
    assert "shards.partition=0" in (tmp_path / "stresnet.args").read_text().splitlines()


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


def submit_training(slurm: SlurmCluster, tiny: Path, workdir: Path, *overrides: str,
                    sbatch: tuple[str, ...] = (), env: dict[str, str] | None = None) -> int:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    return slurm.sbatch([*SMALL, *sbatch, str(SCRIPTS / "train_ucf101.sh"), *overrides], cwd=workdir,
                        env={"CONFIG": str(tiny), "STRESNET_DIR": str(REPO), **(env or {})})


def wait_for_log(slurm: SlurmCluster, job_id: int, log: Path, text: str, timeout: float = 300) -> None:
    slurm.wait_until(job_id, lambda job: log.exists() and text in log.read_text(), timeout=timeout)


def log_time(log: str, message: str) -> datetime:
    """When ray_train.sh logged ``message`` (its lines start "ray_train.sh [HH:MM:SS]"), today."""
    stamp = re.search(r"ray_train\.sh \[(\d\d:\d\d:\d\d)\] [^\n]*" + re.escape(message), log).group(1)
    return datetime.combine(datetime.now(timezone.utc).date(), time.fromisoformat(stamp), timezone.utc)


def assert_resumed_and_complete(log: str, tiny: Path, job_id: int) -> int:
    """The job's run went on from a checkpoint to the planned last step, every step logged once
    at least; returns the step it resumed at."""
    steps = planned_steps(log)
    resumed = re.search(r"resumed at step (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < steps, log[-3000:]
    assert f"steps:      {steps}" in log, log[-3000:]
    run = tiny.parent / "runs" / f"stresnet-ucf101-{job_id}"
    assert (run / f"checkpoint_{steps:07d}" / "model.pt").is_file()
    assert sorted(loss_history(tiny, mlflow_run_id(log))) == list(range(1, steps + 1))
    return int(resumed.group(1))


def job_log(workdir: Path, job_id: int) -> str:
    return (workdir / "logs" / f"stresnet-ucf101-{job_id}.out").read_text()


def assert_no_ray_left(job_id: int) -> None:
    """The job stopped its Ray processes and removed its temp folder."""
    assert not Path(f"/tmp/ray-{job_id}").exists()
    found = subprocess.run(["pgrep", "-f", f"/tmp/ray-{job_id}"], capture_output=True, text=True)
    assert found.stdout == "", f"Ray processes of job {job_id} still running: {found.stdout}"


def only_exported(**variables: str | None) -> str:
    """sbatch --export without ALL: the job, and any srun in it (SLURM_EXPORT_ENV), get these
    variables (and SLURM_*) only, as with a site's --export=NONE default."""
    return "--export=" + ",".join(f"{name}={value}" for name, value in variables.items() if value)


@pytest.mark.slow
@pytest.mark.slurm
def test_training_job_completes_without_the_submit_environment(slurm, tiny, tmp_path):
    # As at sites that default to --export=NONE: only what a user must pass (PYTHONPATH: where
    # the venv's editable install points elsewhere, as in a developer's worktree).
    export = only_exported(CONFIG=str(tiny), STRESNET_DIR=str(REPO), PYTHONPATH=os.environ.get("PYTHONPATH"))
    job_id = submit_training(slurm, tiny, tmp_path, sbatch=(export,))
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


def parents() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) of every process on the machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        found[int(entry.name)] = (int(rest.split()[1]), name)
    return found


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, their children and so on (what proctrack/linuxproc
    signals when SLURM signals a job step)."""
    table, found, todo = parents(), [], [pid]
    while todo:
        parent = todo.pop()
        children = [child for child, (ppid, _) in table.items() if ppid == parent]
        found += children
        todo += children
    return found


def worker_node_raylet(job_id: int) -> int:
    """The pid of the raylet of the job's worker node (started by `ray start --address=...`)."""
    def cmdline(pid: int) -> list[str]:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            return []

    table = parents()
    starts = {pid for pid in table if "start" in cmdline(pid) and f"--temp-dir=/tmp/ray-{job_id}" in cmdline(pid)
              and any(arg.startswith("--address=") for arg in cmdline(pid))}
    for pid, (parent, name) in table.items():
        if parent in starts and name == "raylet":
            return pid
    raise AssertionError(f"no worker-node raylet of job {job_id} found")


@pytest.mark.slow
@pytest.mark.slurm
def test_a_dead_raylet_requeues_the_job_and_the_run_resumes(slurm, tiny, tmp_path):
    """The raylet of the worker node dies, the machine stays up: before, Ray Train waited for
    the lost node's resources until the job's time limit (TIMEOUT, not requeued)."""
    job_id = submit_training(slurm, tiny, tmp_path, env={"RAY_NODE_LOSS_GRACE": "20"})
    logs = tmp_path / "logs" / f"stresnet-ucf101-{job_id}.out"
    wait_for_log(slurm, job_id, logs, "(total 5/")  # after the checkpoint at step 4
    os.kill(worker_node_raylet(job_id), 9)
    killed = datetime.now(timezone.utc)
    job = slurm.wait(job_id, timeout=600)[0]
    log = logs.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "a Ray worker node (the srun step) exited: asking the training to checkpoint" in log
    requeued = log_time(log, f"requeueing job {job_id} to resume from the last checkpoint")
    print(f"raylet killed -> requeue: {(requeued - killed).total_seconds():.0f} s")
    assert f"job {job_id} (restart 1)" in log
    # From the latest checkpoint Ray Train had registered (it registers them every 2 s or so).
    assert_resumed_and_complete(log, tiny, job_id)
    assert_no_ray_left(job_id)


@pytest.mark.slow
@pytest.mark.slurm
def test_preemption_checkpoints_within_the_grace_time_and_the_run_resumes(slurm, tiny, tmp_path):
    """A job of a higher-tier partition needs the nodes: SLURM sends SIGTERM to the job's steps
    (the srun'd Ray worker node, not the batch script) and kills the job GraceTime later.
    Before, that SIGTERM killed the worker node's Ray at once: no checkpoint, a failed run."""
    job_id = submit_training(slurm, tiny, tmp_path)
    logs = tmp_path / "logs" / f"stresnet-ucf101-{job_id}.out"
    wait_for_log(slurm, job_id, logs, "(total 3/")
    urgent = slurm.sbatch(["--partition=urgent", "--nodes=1", "--cpus-per-task=1", "--mem=100",
                           "--time=2", f"--output={tmp_path}/logs/urgent-%j.out", "--wrap=true"], cwd=tmp_path)
    preempted = datetime.now(timezone.utc)
    job = slurm.wait(job_id, timeout=600)[0]
    log = logs.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert int(job["Restarts"]) >= 1
    assert slurm.jobs(urgent)[0]["JobState"] == "COMPLETED"
    assert "SIGTERM on" in log and "asking run stresnet-ucf101-" in log  # from the worker node
    stopped = re.search(r"stopped on request at step (\d+)", log)
    assert stopped, log[-3000:]
    checkpointed = log_time(log, f"training stopped at a checkpoint (status 75): requeueing job {job_id}")
    print(f"preemption -> checkpoint and requeue: {(checkpointed - preempted).total_seconds():.0f} s")
    assert (checkpointed - preempted).total_seconds() < SlurmCluster.GRACE_TIME
    assert assert_resumed_and_complete(log, tiny, job_id) == int(stopped.group(1))
    assert_no_ray_left(job_id)


def start_ray_head(job_id: int, log: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """`ray_node.sh head` as job ``job_id``'s batch script runs it (its own token), on this machine."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    env = {**clean, "SLURM_JOB_ID": str(job_id), "SLURM_CPUS_ON_NODE": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": os.urandom(32).hex(), "RAY_USAGE_STATS_ENABLED": "0"}
    address = subprocess.run(["bash", str(SCRIPTS / "ray_node.sh"), "address"], env=env, capture_output=True,
                             text=True, check=True, timeout=60).stdout.strip()
    with open(log, "wb") as out:
        head = subprocess.Popen(["bash", str(SCRIPTS / "ray_node.sh"), "head"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return head, address, env


def ray_tasks_run(address: str, env: dict[str, str]) -> str:
    """A driver on the cluster at ``address`` runs a few tasks (their workers bind ports)."""
    done = subprocess.run([sys.executable, "-c", """
import os, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
pid = ray.remote(num_cpus=0)(lambda: os.getpid())
print(len(set(ray.get([pid.remote() for _ in range(4)]))), "worker(s)")
""", address], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_two_jobs_150_ids_apart_run_ray_on_one_node_and_sigterm_does_not_stop_it(tmp_path):
    """Two jobs' Ray heads on one machine: they used to share Ray's worker port range
    (30000 + 200 * (job id % 150)). Then SLURM's preemption SIGTERM to every process of one
    job: its Ray keeps running (the run must be able to checkpoint); SIGUSR2 stops it."""
    heads = {}
    try:
        for job_id in (4100, 4250):  # one after the other: Ray gives a node 30 s to start
            heads[job_id] = head, address, env = start_ray_head(job_id, tmp_path / f"head-{job_id}.log")
            done = subprocess.run([sys.executable, "-m", "cluster.ray_nodes", "--address", address, "--nodes", "1",
                                   "--timeout", "240", "--watch-pid", str(head.pid)], env=env,
                                  capture_output=True, text=True, timeout=400)
            assert done.returncode == 0, (done.stderr, (tmp_path / f"head-{job_id}.log").read_text()[-3000:])
        for head, address, env in heads.values():
            assert "worker(s)" in ray_tasks_run(address, env)
        # SIGTERM to every process of job 4100 (as slurmstepd does), then its Ray still works.
        head, address, env = heads[4100]
        job_processes = [head.pid, *descendants(head.pid)]
        assert len(job_processes) > 3
        for pid in job_processes:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        clock.sleep(10)
        assert head.poll() is None, (tmp_path / "head-4100.log").read_text()[-3000:]
        assert "worker(s)" in ray_tasks_run(address, env)
    finally:
        for head, _, _ in heads.values():
            if head.poll() is None:
                head.send_signal(signal.SIGUSR2)  # stops this node
        for job_id, (head, _, _) in heads.items():
            try:
                assert head.wait(timeout=120) == 0, (tmp_path / f"head-{job_id}.log").read_text()[-3000:]
            finally:
                if head.poll() is None:
                    head.kill()
    for job_id in heads:
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
    # Not the default partition: the finalize job must run where the array runs.
    array_id = slurm.sbatch(
        ["--array=0-2", "--cpus-per-task=1", "--time=10", "--partition=urgent", str(SCRIPTS / "make_shards.sh")],
        cwd=tmp_path, env={"CONFIG": str(config), "STRESNET_DIR": str(REPO)},
    )
    tasks = slurm.wait(array_id, timeout=300)
    first_log = (tmp_path / "logs" / f"stresnet-shards-{array_id}_0.out").read_text()
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 3, first_log
    finalize_id = int(re.search(r"finalize job (\d+)", first_log).group(1))
    finalize = slurm.wait(finalize_id, timeout=120)[0]
    assert finalize["JobState"] == "COMPLETED", [p.read_text() for p in (tmp_path / "logs").glob("*finalize*")]
    assert finalize["Partition"] == "urgent"
    written = {(split, partition) for split in ("train", "test") for partition in range(3)
               if (out / fmt.shard_name(split, partition, 0)).is_file()}
    assert len(written) == 6  # every task wrote its partition of both splits
    single = read_samples(tiny.parent / "shards")
    assert read_samples(out) == single
    assert len(single) == fmt.read_manifest(out)["splits"]["train"]["samples"] + \
        fmt.read_manifest(out)["splits"]["test"]["samples"]
