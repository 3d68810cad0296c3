"""The MLflow UI in a real browser: two finished tiny runs, `mlflow server` on 127.0.0.1, headless
Chromium (Debian's `chromium`, installed with apt-get when missing) renders the experiment's runs
page and the compare page; the rendered DOM must name both runs, the shards dataset and the top-1
metrics. Screenshots stay in the test's folder (``ui-runs.png``, ``ui-compare.png``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import quote
from pathlib import Path

import pytest

from tiny_run import make_tiny_shards, tiny_config

REPO = Path(__file__).resolve().parents[1]


def chromium() -> str:
    """The chromium binary; installed with apt-get when missing, else the test is skipped."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and apt-get cannot install it here (not root or no apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"apt-get could not install chromium: {done.stderr.strip()[-300:]}")
    return shutil.which("chromium") or pytest.skip("apt-get ran but no chromium binary appeared")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(browser: str, url: str, screenshot: Path) -> str:
    """The DOM of ``url`` after its scripts ran (virtual time), and a screenshot of it."""
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--window-size=1600,1000", "--virtual-time-budget=20000", "--hide-scrollbars"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    done = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    return done.stdout


@pytest.mark.slow
def test_runs_and_compare_pages_show_runs_dataset_and_metrics(tmp_path):
    browser = chromium()
    make_tiny_shards(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    names = ["ui-first", "ui-second"]
    for name in names:  # one after the other: the same sqlite store
        config = tiny_config(tmp_path, "train.epochs=2", "train.validate_every=2", f"train.run_name={name}")
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--config", str(config)],
                              capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "?workflowType=machine_learning" in done.stdout

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("stresnet-synthetic")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    assert set(names) <= set(runs)

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600  # minutes on a loaded machine
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("mlflow server did not come up:\n" + (tmp_path / "server.log").read_text()[-3000:])
        eid = experiment.experiment_id
        runs_dom = render(browser, f"{base}/#/experiments/{eid}/runs?workflowType=machine_learning",
                          tmp_path / "ui-runs.png")
        (tmp_path / "ui-runs.html").write_text(runs_dom)
        ids = quote(json.dumps([runs[n] for n in names], separators=(",", ":")))
        experiments = quote(json.dumps([eid], separators=(",", ":")))
        compare_dom = render(browser, f"{base}/#/compare-runs?runs={ids}&experiments={experiments}",
                             tmp_path / "ui-compare.png")
        (tmp_path / "ui-compare.html").write_text(compare_dom)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
    print(f"screenshots: {tmp_path / 'ui-runs.png'} {tmp_path / 'ui-compare.png'}")
    for name in names:
        assert name in runs_dom, f"{name} not on the runs page ({tmp_path / 'ui-runs.html'})"
        assert name in compare_dom, f"{name} not on the compare page ({tmp_path / 'ui-compare.html'})"
    assert "synthetic-shards" in runs_dom  # the Dataset column
    for metric in ("val_fused_top1", "val_appearance_top1", "val_motion_top1"):
        assert metric in compare_dom, metric
    assert (tmp_path / "ui-runs.png").stat().st_size > 10_000
    assert (tmp_path / "ui-compare.png").stat().st_size > 10_000
