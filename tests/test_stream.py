"""Streaming access (``data.access: stream``, pipelines/loaders/stream.py) against a real HTTP
server on 127.0.0.1 serving tiny shards (tests/loader_shards.py), as two DDP ranks."""

from __future__ import annotations

import collections
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from http_shards import Server
from loader_shards import config, replace_member, write_shards
from pipelines.loaders import build_loader
from pipelines.loaders.clips import ClipSource, decode_clip
from pipelines.loaders.schedule import ClipRequest
from pipelines.loaders.shard_reader import DamagedShardsError, ShardIndex
from pipelines.loaders.stream import ClipStream, ShardStreamError, assign
from stresnet.config import ConfigError
from stresnet.sampling import normalize_clip

# 11 training videos in shards of 3, 3, 3, 2 samples: ranks load 6 and 5 (one top-up clip on
# rank 1 at batch size 2), so the equal-steps rule is exercised.
TRAIN_FRAMES = [8, 9, 10, 12, 7, 8, 9, 11, 6, 8, 10]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("stream") / "shards",
                        {"train": TRAIN_FRAMES, "test": [8, 9]}, per_shard=3)


@pytest.fixture(scope="module")
def server(shards):
    server = Server(shards)
    yield server
    server.stop()


def stream_config(shards: Path, url: str, **overrides):
    return config(shards, **{"data.access": "stream", "data.stream_url": url,
                             "data.stream_shuffle_buffer": 4, **overrides})


def epoch_batches(loader, epoch: int) -> list[dict]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_stream_over_http_equal_steps_and_every_video_each_epoch(shards, server, workers):
    cfg = stream_config(shards, server.url, **{"data.loader_workers": workers})
    loaders = [build_loader(cfg, "train", rank, 2, backend="cpu", train=True) for rank in (0, 1)]
    # loads 6 and 5 clips at B = 2: 3 batches on each rank
    assert [len(loader) for loader in loaders] == [3, 3]
    orders = []
    for epoch in (0, 1):
        seen = collections.Counter()
        for loader in loaders:
            batches = epoch_batches(loader, epoch)
            assert len(batches) == 3
            for batch in batches:
                assert batch["rgb"].shape == (2, 3, 3, 24, 24)
                assert batch["flow"].shape == (2, 3, 4, 24, 24)
                assert batch["label"].tolist() == [int(v[1:]) % 3 for v in batch["video_id"]]
                seen.update(batch["video_id"])
        orders.append([v for loader in loaders for v in seen])
        # every training video at least once; 12 clips for 11 videos: one top-up repeat
        assert set(seen) == {f"v{i:03d}" for i in range(len(TRAIN_FRAMES))}
        assert sum(seen.values()) == 12 and max(seen.values()) == 2
    requested = server.requests()
    assert all(r.startswith("/train-") for r in requested)  # training never reads test shards
    assert {r.strip("/") for r in requested} == {f"train-p000-0000{i}.tar" for i in range(4)}


def test_streamed_clip_is_the_random_access_clip_of_that_video_and_epoch(shards, server):
    """Same plan, same members, same pixels: streaming decodes exactly the frames the clip needs."""
    cfg = stream_config(shards, server.url)
    index = ShardIndex(shards, "train")
    source = ClipSource(config(shards), index)
    by_video = {index.ref(i).video_id: i for i in range(len(index))}
    loader = build_loader(cfg, "train", 1, 2, backend="cpu", train=True)
    for batch in epoch_batches(loader, 3):
        for k, video in enumerate(batch["video_id"]):
            clip = source.load(ClipRequest(by_video[video], 3), lambda c: c)
            rgb, flow, _ = decode_clip(clip)
            ref_rgb, ref_flow = normalize_clip(torch.from_numpy(rgb)[None], torch.from_numpy(flow)[None],
                                               torch.tensor([clip.plan.flip]), "none")
            torch.testing.assert_close(batch["rgb"][k], ref_rgb[0], rtol=0, atol=0)
            torch.testing.assert_close(batch["flow"][k], ref_flow[0], rtol=0, atol=0)


def test_the_stream_is_deterministic_and_reshuffled_each_epoch(shards, server):
    cfg = stream_config(shards, server.url, **{"data.loader_workers": 2})
    first = build_loader(cfg, "train", 0, 2, backend="cpu", train=True)
    again = build_loader(cfg, "train", 0, 2, backend="cpu", train=True)

    def videos(loader, epoch):
        return [b["video_id"] for b in epoch_batches(loader, epoch)]

    assert videos(first, 0) == videos(again, 0)  # what a resumed run relies on
    assert videos(first, 0) != videos(first, 1)
    torch.testing.assert_close(epoch_batches(first, 2)[1]["flow"], epoch_batches(again, 2)[1]["flow"])


@pytest.mark.parametrize("workers", [0, 2])
def test_dali_loader_streams_the_same_batches_as_the_cpu_loader(shards, server, workers):
    pytest.importorskip("nvidia.dali")
    cfg = stream_config(shards, server.url, **{"data.dali_device": "cpu", "data.loader_workers": workers})
    cpu = build_loader(cfg, "train", 0, 2, backend="cpu", train=True)
    dali = build_loader(cfg, "train", 0, 2, backend="dali", train=True)
    assert len(dali) == len(cpu) == 3
    for epoch in (0, 1, 0):
        ours, theirs = epoch_batches(dali, epoch), epoch_batches(cpu, epoch)
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs):
            assert a["video_id"] == b["video_id"] and torch.equal(a["label"], b["label"])
            # DALI's libjpeg-turbo vs OpenCV, resize rounding: a few grey levels at most
            assert (a["rgb"] - b["rgb"]).abs().max() * 255 * 0.229 <= 3.5
            assert (a["flow"] - b["flow"]).abs().max() * 57.6 <= 3.5
    # an epoch left after one batch, then a whole one: the same pipeline, no stale batches
    dali.set_epoch(1)
    next(iter(dali))
    again = epoch_batches(dali, 1)
    assert [b["video_id"] for b in again] == [b["video_id"] for b in epoch_batches(cpu, 1)]
    assert dali.builds == 1


def test_a_connection_dropped_mid_shard_is_retried(shards, caplog):
    server = Server(shards, drop="once")
    try:
        cfg = stream_config(shards, server.url, **{"data.stream_retries": 2})
        loader = build_loader(cfg, "train", 0, 2, backend="cpu", train=True)
        with caplog.at_level(logging.WARNING):
            batches = epoch_batches(loader, 0)
        assert len(batches) == 3
        assert len({v for b in batches for v in b["video_id"]}) == 6  # rank 0's two shards, whole
        assert "stream broke off after" in caplog.text and "opening it again" in caplog.text
        # each of rank 0's shards was requested twice: dropped, then whole
        assert sorted(collections.Counter(server.requests()).values()) == [2, 2]
    finally:
        server.stop()


def test_a_connection_that_keeps_dropping_is_a_named_error_with_the_url(shards):
    server = Server(shards, drop="always")
    try:
        cfg = stream_config(shards, server.url, **{"data.stream_retries": 1})
        loader = build_loader(cfg, "train", 0, 2, backend="cpu", train=True)
        with pytest.raises(ShardStreamError, match=rf"http://127.0.0.1:{server.port}/train-p000-0000\d\.tar: "
                           r"stream broke off after \d of 3 samples .*gave up after 2 attempts"):
            epoch_batches(loader, 0)
    finally:
        server.stop()


def test_a_truncated_local_shard_is_a_named_error(tmp_path):
    folder = write_shards(tmp_path / "shards", {"train": [6, 7, 8, 9]}, per_shard=2)
    shard = folder / "train-p000-00001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = config(folder, **{"data.access": "stream", "data.stream_retries": 0})
    loader = build_loader(cfg, "train", 0, 1, backend="cpu", train=True)
    with pytest.raises(ShardStreamError, match=rf"{shard}: stream broke off after"):
        epoch_batches(loader, 0)


@pytest.mark.parametrize("sizes, parts", [([3, 3, 3, 2], 2), ([5, 1, 1, 1, 4, 4, 2], 3), ([2] * 7, 4)])
def test_shard_assignment_covers_every_shard_and_keeps_loads_across_epochs(sizes, parts):
    loads = None
    for epoch in range(5):
        dealt = assign(sizes, parts, seed=1, epoch=epoch, salt=0)
        assert sorted(i for part in dealt for i in part) == list(range(len(sizes)))
        these = [sum(sizes[i] for i in part) for part in dealt]
        assert loads is None or these == loads
        loads = these
    assert max(loads) - min(loads) <= max(sizes)


def test_worker_quotas_add_up_to_whole_batches(shards):
    cfg = stream_config(shards, "http://unused/{name}", **{"data.batch_size_per_worker": 4})
    for rank in (0, 1):
        stream = ClipStream(cfg, "train", rank, 2)
        for workers in (1, 2, 3):
            plans = [stream.worker_plan(5, w, workers) for w in range(workers)]
            assert sum(q for _, q in plans) == stream.batches * 4 == math.ceil(6 / 4) * 4
            assert sorted(s.url for shards_, _ in plans for s in shards_) == sorted(
                s.url for s in stream.rank_shards(5))


def test_bad_stream_settings_are_refused(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"stream_url: got 'http://host/x.tar', expected exactly one '\{name\}'"):
        stream_config(shards, "http://host/x.tar")
    with pytest.raises(ValueError, match=r"split 'test' has 1 shards, fewer than the 2 ranks"):
        ClipStream(stream_config(shards, "http://h/{name}"), "test", 0, 2)
    manifest = (shards / "manifest.json").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(manifest.replace("train-p000-00000.tar", "x; rm -rf y.tar"))
    with pytest.raises(ValueError, match=r"shard name 'x; rm -rf y.tar' is not a plain file name"):
        ClipStream(stream_config(bad, "pipe:cat /data/{name}"), "train", 0, 2)


def test_evaluation_keeps_random_access_in_stream_mode(shards):
    cfg = stream_config(shards, "http://127.0.0.1:9/{name}")  # nothing listens there
    loader = build_loader(cfg, "test", 0, 1, backend="cpu", train=False)
    items = [(v, int(w)) for b in loader for v, w in zip(b["video_id"], b["view"])]
    assert sorted(items) == [("v011", 0), ("v011", 1), ("v012", 0), ("v012", 1)]  # each once


def test_a_pipe_command_url_streams_too(shards):
    cfg = stream_config(shards, f"pipe:cat {shards}/{{name}}")
    loader = build_loader(cfg, "train", 1, 2, backend="cpu", train=True)
    batches = epoch_batches(loader, 0)
    assert len(batches) == 3 and np.all([b["rgb"].shape[0] == 2 for b in batches])


def test_preflight_opens_the_first_streamed_shard(shards, server, tmp_path):
    from cluster.preflight import PreflightError, preflight

    preflight(stream_config(shards, server.url))  # reachable: passes
    with pytest.raises(PreflightError, match=r"data.stream_url: http://127.0.0.1:9/train-p000-00000.tar: "
                       r"cannot be read"):
        preflight(stream_config(shards, "http://127.0.0.1:9/{name}"))
    (tmp_path / "train-p000-00000.tar").write_text("<html>not found</html>")
    with pytest.raises(PreflightError, match=rf"data.stream_url: {tmp_path}/train-p000-00000.tar: "
                       r"does not start like a tar file \(got 22 bytes\)"):
        preflight(stream_config(shards, f"{tmp_path}/{{name}}"))


def test_a_damaged_streamed_sample_is_skipped_counted_and_replaced(tmp_path):
    folder = write_shards(tmp_path / "shards", {"train": [6, 7, 8, 9, 6, 7]}, per_shard=3)
    replace_member(folder / "train-p000-00000.tar", "v001.json", b"{not json")
    cfg = config(folder, **{"data.access": "stream", "data.max_damaged_fraction": 0.5})
    loader = build_loader(cfg, "train", 0, 1, backend="cpu", train=True)
    batches = epoch_batches(loader, 0)
    assert len(batches) == 3 and all(len(b["video_id"]) == 2 for b in batches)  # still full
    videos = [v for b in batches for v in b["video_id"]]
    assert "v001" not in videos and set(videos) == {"v000", "v002", "v003", "v004", "v005"}
    assert sum(b["skipped"] for b in batches) == 1 == loader.skipped
    strict = build_loader(config(folder, **{"data.access": "stream"}), "train", 0, 1,
                          backend="cpu", train=True)
    with pytest.raises(DamagedShardsError, match=r"split 'train' \(streamed\): 1 of 6 samples damaged"):
        epoch_batches(strict, 0)
