"""A real SLURM cluster on this machine, for the tests of ``slurm/``.

:func:`install_slurm` installs Debian's ``slurm-wlm`` and ``munge`` when they are missing (CI
starts from a fresh machine); it skips only where that is impossible (not root, no apt-get).
:class:`SlurmCluster` starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as child
processes, with everything they write (key, sockets, state, spool, logs) in one folder and ports
picked free, so it touches no system-wide SLURM or munge setup and two test sessions don't collide.
:meth:`SlurmCluster.stop` cancels the jobs and stops exactly the daemons it started.

The config is the smallest that runs batch jobs, arrays, dependencies, signals and requeues
without cgroups (containers rarely allow them): ``proctrack/linuxproc``, ``task/none``, no
accounting database (job states come from ``scontrol show job``; finished jobs stay visible for
``MinJobAge`` seconds). With ``nodes`` > 1 it runs one ``slurmd -N nK`` per node, all on this
machine (each with its own port, spool folder and log), so multi-node jobs and ``srun`` across
nodes run for real; the nodes just share the machine's CPUs.

Preemption is configured as many sites do it: jobs in the default partition ``debug`` are
requeued (``PreemptMode=REQUEUE``) when a job of the higher-tier partition ``urgent`` needs their
nodes, after a ``GraceTime`` of :attr:`SlurmCluster.GRACE_TIME` seconds that starts with a
SIGTERM to the job's steps (not its batch script).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE",
}


def install_slurm() -> None:
    """Install slurm-wlm and munge with apt-get if a daemon is missing; skip where impossible."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root: slurm-wlm/munge are not installed and apt-get needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("SLURM tests need Debian's slurm-wlm and munge, and there is no apt-get here")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd for this host, configured and run out of ``root``."""

    GRACE_TIME = 120  # seconds a preempted job of partition debug may run on

    def __init__(self, root: Path, nodes: int = 1, cpus_per_node: int | None = None):
        self.root = Path(root)
        self.cpus = cpus_per_node or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        # One node: the usual name, `hostname -s`; several: n1, n2, ... all on this host.
        self.nodes = [self.host] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.processes: list[subprocess.Popen] = []

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "SlurmCluster":
        """Start the daemons and wait until the node accepts jobs."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        munge = self.root / "munge"
        for folder in (munge, self.root / "state", self.root / "spool", self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o711)  # munged refuses a socket folder others may write into
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))  # a fresh key: this cluster trusts no one else
        key.chmod(0o600)
        socket_path = munge / "munge.socket"
        self._spawn("munged", [
            "munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
            f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
            f"--log-file={self.logs / 'munged.log'}",
        ])
        self._wait_for(socket_path.exists, timeout, "munged did not create its socket")
        self.conf.write_text(self._slurm_conf(socket_path))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self._wait_for(self._nodes_ready, timeout, "the nodes did not become idle (see log/)")

    def _slurm_conf(self, munge_socket: Path) -> str:
        root = self.root
        return "\n".join([
            "ClusterName=stresnet-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={free_port()}",
            # cred_expire is also how long a requeued job waits before it may start again
            # (default 120 s); 10 s keeps the requeue test short.
            f"AuthInfo=socket={munge_socket},cred_expire=10",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobRequeue=1",
            "MinJobAge=3600",
            "KillWait=10",
            "ReturnToService=2",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",  # %n: the node name
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd-%n.log'}",
            *(f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={free_port()} "
              f"CPUs={self.cpus} RealMemory=1024 State=UNKNOWN" for node in self.nodes),
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            f"PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
            f"GraceTime={self.GRACE_TIME}",
            "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF",
            "",
        ])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.logs / f"{name}.out", "ab")
        self.processes.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
        out.close()

    def _nodes_ready(self) -> bool:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; see {self.logs}")
        done = self.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], check=False)
        states = dict(line.split() for line in done.stdout.splitlines())  # a line per partition
        return done.returncode == 0 and states == {node: "idle" for node in self.nodes}

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started (newest first)."""
        if any(p.poll() is None for p in self.processes) and self.conf.exists():
            self.run(["scancel", "--full", f"--user={os.getuid()}"], check=False)
            try:
                self._wait_for(lambda: not self.run(["squeue", "--noheader"], check=False).stdout.strip(),
                               30, "")
            except (TimeoutError, RuntimeError):
                pass  # the daemons go anyway; slurmd takes its job steps with it
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self.processes.clear()

    @staticmethod
    def _wait_for(ready, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(message)
            time.sleep(0.5)

    # ---- client commands -------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for SLURM client commands (sbatch, squeue, ...) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit; returns the job id."""
        done = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=self.env(**(env or {})))
        return int(done.stdout.strip().split(";")[0])

    def jobs(self, job_id: int) -> list[dict[str, str]]:
        """``scontrol show job`` as dicts: one per job (an array job gives one per task)."""
        done = self.run(["scontrol", "show", "job", "--oneliner", str(job_id)])
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in done.stdout.splitlines() if line]

    def wait(self, job_id: int, timeout: float) -> list[dict[str, str]]:
        """Wait until the job (every task of an array) reached a final state; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(job_id)
            if jobs and all(job["JobState"] in FINAL_STATES for job in jobs):
                return jobs
            if time.monotonic() > deadline:
                self.run(["scancel", str(job_id)], check=False)
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {jobs}")
            time.sleep(1)

    def wait_until(self, job_id: int, predicate, timeout: float) -> dict[str, str]:
        """Wait until ``predicate(job)`` holds for a (non-array) job; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.jobs(job_id)[0]
            if predicate(job):
                return job
            if job["JobState"] in FINAL_STATES or time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: condition not reached: {job}")
            time.sleep(0.5)
