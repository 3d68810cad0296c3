"""Two `stresnet train` runs at once on one host: each starts its own local Ray, both finish, and
neither prints tracebacks or Ray error lines that are not errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_run import make_tiny_shards, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_trainings_at_once_on_one_host_both_finish_quietly(tmp_path):
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
        for noise in ("max_restarts", " ERROR "):
            assert noise not in output, f"{name}: {noise!r} in\n{output[-4000:]}"
        # Known and still open (issue 12 item 4): Ray Train's placement-group cleaner, a detached
        # actor, asks the state API for "the" local Ray and finds two; its thread dies with a
        # traceback, harmlessly (the run is not affected). Any other traceback fails the test.
        assert output.count("Traceback") == output.count("Found multiple active Ray instances"), \
            f"{name}: a traceback in\n{output[-4000:]}"
