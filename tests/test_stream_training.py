"""`stresnet train` with 2 Ray Train workers streaming the training shards from a local HTTP
server (``data.access: stream``): the workers' local shard folder holds only the manifest and the
test shards, so every training sample comes over HTTP."""

from __future__ import annotations

import shutil

import pytest
import torch

from cluster.train import run_training
from http_shards import Server
from stresnet.checkpoint import load_train_state
from cluster.config import load_config
from test_training import TINY, assert_same_weights, final_weights

# 21 training videos in shards of 4 (4, 4, 4, 4, 4, 1): ranks load 12 and 9 clips, 2 batches of
# 6 each, one optimizer step of 12 clips; 3 epochs; a checkpoint after step 3 (mid-epoch 2).
RUN = ["data.batch_size_per_worker=6", "train.global_batch_size=12", "train.epochs=3",
       "train.checkpoint_every=3", "train.validate_every=3", "train.lr_steps=[4]"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from pipelines.shards import make_shards

    root = tmp_path_factory.mktemp("stream_training")
    shards = root / "served"
    make_shards(load_config(TINY, [f"dataset.root={root}/videos", f"shards.output={shards}",
                                   "shards.samples_per_shard=4"]))
    local = root / "local"  # what the workers see on disk: the manifest and the test split
    local.mkdir()
    for path in [shards / "manifest.json", *shards.glob("test-*")]:
        shutil.copy(path, local / path.name)
    server = Server(shards)
    overrides = [f"data.shards={local}", "data.access=stream", f"data.stream_url={server.url}",
                 "data.stream_shuffle_buffer=8", f"train.storage_path={root}/runs",
                 f"tracking.uri=sqlite:///{root}/mlflow.db", f"eval.output={root}/eval", *RUN]
    yield overrides, server
    server.stop()
    import ray

    ray.shutdown()


def tiny(workspace, *more: str):
    return load_config(TINY, [*workspace[0], *more])


@pytest.mark.slow
def test_two_workers_train_from_http_and_a_killed_worker_resumes_the_same(workspace):
    straight = run_training(tiny(workspace, "train.run_name=straight"))
    assert straight.steps == 6  # 2 steps per epoch on both ranks, 3 epochs
    assert load_train_state(straight.checkpoint)["epoch"] == 2
    served = workspace[1].requests()
    assert served and all(r.startswith("/train-") for r in served)
    # 6 shards per epoch over 2 ranks, 3 epochs: each shard once per epoch (rank 1 tops up
    # its batches by reading its first shard again)
    assert len(served) >= 6 * 3

    # Killed at step 4, before that step's checkpoint: restarts from step 3 (mid-epoch 2),
    # re-reads and drops the batch that epoch already used, and ends with the same weights.
    killed = run_training(tiny(workspace, "train.run_name=killed", "train.fail_at_step=4"))
    assert (killed.run_dir / "failure_injected").is_file()
    assert killed.steps == straight.steps
    assert_same_weights(final_weights(killed), final_weights(straight))
    assert torch.isfinite(next(iter(final_weights(straight).values()))).all()
