"""The local Ray that `stresnet train` starts (``cluster.address: null``) is private to its run.

Ray's servers listen on every interface (binding them to 127.0.0.1 is not possible), so what
keeps others out is token authentication with a token of the run's own: a client without it,
and a client with the user's ``~/.ray/auth_token``, are refused; the run's own token connects
(so the refusals come from authentication, not from a wrong address). The token is never
written to disk. The driver starts its Ray exactly as `stresnet train` does (``connect_ray``
before any Ray import), in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, logging, os, sys
from cluster.local_ray import NOISE
from cluster.train import connect_ray
from cluster.config import RunConfig

gcs = connect_ray(RunConfig())
import logging.config
import psutil  # Ray's copy (ray/thirdparty_files): importable once Ray is
import ray

@ray.remote
def noise_printed() -> bool:
    # As in Ray Train's controller (env_vars of its own, as here): configure "ray.train"
    # at WARNING, then log the warning it logs when a loaded machine delays a request.
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                               "loggers": {"ray.train": {"level": "WARNING"}}})
    logger = logging.getLogger(NOISE[0])
    return logger.isEnabledFor(logging.WARNING) and logger.filter(
        logger.makeRecord(NOISE[0], logging.WARNING, "", 0, "Failed to send", (), None)) is not False


children = psutil.Process().children(recursive=True)
listening = sorted({
    f"{c.laddr.ip}:{c.laddr.port} {psutil.Process(c.pid).name()}"
    for c in psutil.net_connections("inet")
    if c.status == psutil.CONN_LISTEN and c.pid in {os.getpid(), *(p.pid for p in children)}
})
print(json.dumps({"gcs": gcs, "token": os.environ.get("RAY_AUTH_TOKEN"),
                  "mode": os.environ.get("RAY_AUTH_MODE"), "listening": listening,
                  "cleaner_address": ray.get(ray.remote(lambda: os.environ.get("RAY_ADDRESS")).remote()),
                  "driver_address": os.environ.get("RAY_ADDRESS"),
                  "noise_printed": ray.get(noise_printed.options(
                      runtime_env={"env_vars": {"X": "1"}}).remote())}), flush=True)
sys.stdin.readline()  # the test's clients connect meanwhile
ray.shutdown()
"""

CLIENT = "import ray; ray.init(address={gcs!r}, logging_level='ERROR'); print('CONNECTED')"


def test_a_local_run_refuses_clients_without_its_own_token(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    # The user's own token (what `ray get-auth-token --generate` writes): it must not open the run.
    (home / ".ray" / "auth_token").write_text("f" * 64)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env = {**clean, "HOME": str(home), "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, cwd=tmp_path, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = driver.stdout.readline()
    if not line:
        raise AssertionError(f"the driver failed: {driver.communicate(timeout=60)[1][-3000:]}")
    try:
        started = json.loads(line)

        def connects(**auth: str) -> bool:
            done = subprocess.run([sys.executable, "-c", CLIENT.format(gcs=started["gcs"])],
                                  env={**clean, "HOME": str(home), **auth}, capture_output=True,
                                  text=True, timeout=180)
            refused = "AuthenticationError" in done.stderr or "InvalidAuthToken" in done.stderr
            assert "CONNECTED" in done.stdout or refused, done.stderr[-3000:]
            return "CONNECTED" in done.stdout

        assert started["mode"] == "token" and len(started["token"]) == 64
        assert not connects(), "a client without a token joined the run's Ray"
        assert not connects(RAY_AUTH_MODE="token"), "the user's ~/.ray/auth_token opened the run's Ray"
        assert connects(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=started["token"])
        # Ray's servers (GCS, raylet, object manager, workers) do listen beyond loopback: the
        # reason for the token. Listed here so that the day Ray binds them to 127.0.0.1 shows.
        assert any(entry.split()[1] == "gcs_server" for entry in started["listening"]), started
    finally:
        driver.communicate("\n", timeout=120)
    assert (home / ".ray" / "auth_token").read_text() == "f" * 64  # the token stays in memory
    assert driver.returncode == 0
    # Ray's own processes (Ray Train's placement-group cleaner among them) find this run's Ray
    # through RAY_ADDRESS, not by looking for "the" Ray on the host; the driver keeps its own.
    assert started["cleaner_address"].endswith(":" + started["gcs"].rsplit(":", 1)[1])
    assert started["driver_address"] is None
    # Ray Train's "safe to ignore" warning with its traceback is not printed (setup hook).
    assert started["noise_printed"] is False
