"""Both loaders over tiny shards with known content (see tests/loader_shards.py)."""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import logging
import math
import pickle
import shutil
import signal
import tarfile
import zlib

import numpy as np
import pytest
import torch

from loader_shards import (
    FLOW_Y_BASE, FRAME_STEP, HEIGHT, WIDTH, config, replace_member, write_shards,
)
from pipelines.loaders import build_loader
from pipelines.loaders.schedule import train_batches
from pipelines.loaders.shard_reader import (
    SampleError, ShardIndex, read_index_file, scan_tar_members,
)
from pipelines.shard_format import rgb_member
from cluster.config import load_config
from stresnet.sampling import FLOW_SCALE, IMAGENET_MEAN, IMAGENET_STD, train_plan

# 12 training videos, two shorter than a clip spans (T=3 positions, stride 1..3, L=2), in shards
# of 4; 5 test videos.
TRAIN_FRAMES = [12, 12, 3, 12, 2, 12, 12, 12, 12, 12, 12, 12]
TEST_FRAMES = [12, 12, 12, 12, 12]
BACKENDS = ["cpu", "dali"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return write_shards(folder, {"train": TRAIN_FRAMES, "test": TEST_FRAMES})


def epoch_batches(loader, epoch: int) -> list[dict]:
    loader.set_epoch(epoch)
    return list(loader)


def frame_numbers(rgb: torch.Tensor) -> torch.Tensor:
    """The frame index each decoded frame shows (green channel = FRAME_STEP * index)."""
    green = rgb[..., 1, :, :] * IMAGENET_STD[1] * 255 + IMAGENET_MEAN[1] * 255
    return torch.round(green.mean(dim=(-1, -2)) / FRAME_STEP).long()


def size_of(video_id: str) -> tuple[int, int, int]:
    """(frames, height, width) of a training video."""
    return TRAIN_FRAMES[int(video_id[1:])], HEIGHT, WIDTH


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_dtypes_and_sampled_frames(shards, backend):
    cfg = config(shards)
    loader = build_loader(cfg, "train", 0, 1, backend=backend)
    assert len(loader) == 6
    batches = epoch_batches(loader, 1)
    assert len(batches) == 6
    for batch in batches:
        assert batch["rgb"].shape == (2, 3, 3, 24, 24) and batch["rgb"].dtype == torch.float32
        assert batch["flow"].shape == (2, 3, 4, 24, 24) and batch["flow"].dtype == torch.float32
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2,)
        assert len(batch["video_id"]) == 2 and "view" not in batch
        for k, vid in enumerate(batch["video_id"]):
            num_frames, h, w = size_of(vid)
            assert int(batch["label"][k]) == int(vid[1:]) % 3
            plan = train_plan(cfg.sampling, 2, cfg.seed, 1, vid, num_frames, h, w)
            # the decoded frames are the planned ones, and the flow stacks the planned fields
            assert frame_numbers(batch["rgb"][k]).tolist() == list(plan.positions)
            flow_y = batch["flow"][k, :, 1::2].mean(dim=(-1, -2)) * FLOW_SCALE + 128
            fields = torch.tensor(plan.flow_indices, dtype=torch.float32)
            assert torch.allclose(flow_y, fields + FLOW_Y_BASE, atol=1.0)


def test_short_videos_yield_valid_clips(shards):
    cfg = config(shards)
    loader = build_loader(cfg, "train", 0, 1, backend="cpu")
    seen = set()
    for epoch in range(3):
        for batch in epoch_batches(loader, epoch):
            for k, vid in enumerate(batch["video_id"]):
                num_frames = TRAIN_FRAMES[int(vid[1:])]
                if num_frames < 5:
                    seen.add(vid)
                    frames = frame_numbers(batch["rgb"][k])
                    assert frames.min() >= 0 and frames.max() <= num_frames - 1
                    assert torch.isfinite(batch["flow"][k]).all()
    assert seen == {"v002", "v004"}


def test_dali_and_cpu_loaders_agree(shards):
    cfg = config(shards)
    cpu = build_loader(cfg, "train", 0, 1, backend="cpu")
    dali = build_loader(cfg, "train", 0, 1, backend="dali")
    for epoch in (0, 3):
        for a, b in zip(epoch_batches(cpu, epoch), epoch_batches(dali, epoch), strict=True):
            assert a["video_id"] == b["video_id"] and torch.equal(a["label"], b["label"])
            assert torch.equal(frame_numbers(a["rgb"]), frame_numbers(b["rgb"]))
            # same crop box and flip: pixels agree up to decoder/resize rounding (bytes)
            rgb_bytes = (a["rgb"] - b["rgb"]).abs() * 255 * max(IMAGENET_STD)
            flow_bytes = (a["flow"] - b["flow"]).abs() * FLOW_SCALE
            assert rgb_bytes.max() <= 3 and rgb_bytes.mean() < 0.5
            assert flow_bytes.max() <= 3 and flow_bytes.mean() < 0.5
    evals = [build_loader(cfg, "test", 0, 1, backend=b) for b in BACKENDS]
    for a, b in zip(*evals, strict=True):
        assert a["video_id"] == b["video_id"] and torch.equal(a["view"], b["view"])
        assert ((a["rgb"] - b["rgb"]).abs() * 255 * max(IMAGENET_STD)).max() <= 3


def motion_direction(red_rows: torch.Tensor) -> int:
    """+1 if the red pattern moves right from frame 0 to frame 1, -1 if left (best shift)."""
    a, b = red_rows[0], red_rows[1]
    errors = {s: float(((torch.roll(a, s) - b)[8:-8] ** 2).mean()) for s in range(-6, 7) if s}
    return 1 if min(errors, key=errors.get) > 0 else -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_clips_read_as_leftward_motion(shards, backend):
    # stride 2 and unscaled crops: the pattern moves 2 px between positions (period 16)
    cfg = config(shards, **{"sampling.stride_min": 2, "sampling.stride_max": 2,
                            "sampling.crop_scale": "[1.0, 1.0]"})
    loader = build_loader(cfg, "train", 0, 1, backend=backend)
    flips = collections.Counter()
    for epoch in range(2):
        for batch in epoch_batches(loader, epoch):
            for k, vid in enumerate(batch["video_id"]):
                num_frames, h, w = size_of(vid)
                if num_frames < 12:
                    continue
                flip = train_plan(cfg.sampling, 2, cfg.seed, epoch, vid, num_frames, h, w).flip
                flips[flip] += 1
                flow_x = batch["flow"][k, :, 0::2].mean()
                red = batch["rgb"][k, :2, 0].mean(dim=1)  # (2 positions, width)
                assert (flow_x < 0) == flip and (flow_x > 0) == (not flip)
                assert motion_direction(red) == (-1 if flip else 1)
    assert flips[True] > 0 and flips[False] > 0


@pytest.mark.parametrize(
    "world_size,batch_size,backend",
    [(2, 2, "cpu"), (3, 2, "cpu"), (2, 5, "cpu"), (3, 5, "cpu"), (3, 5, "dali")],
)
def test_ddp_ranks_split_each_epoch_and_run_equal_batches(shards, world_size, batch_size, backend):
    cfg = config(shards, **{"data.batch_size_per_worker": batch_size})
    n = len(TRAIN_FRAMES)
    for epoch in (0, 1):
        loaders = [build_loader(cfg, "train", r, world_size, backend) for r in range(world_size)]
        per_rank = [[v for b in epoch_batches(ld, epoch) for v in b["video_id"]] for ld in loaders]
        lengths = {len(ld) for ld in loaders}
        assert len(lengths) == 1
        num_batches = lengths.pop()
        assert num_batches == math.ceil(math.ceil(n / world_size) / batch_size)
        assert all(len(v) == num_batches * batch_size for v in per_rank)
        counts = collections.Counter(v for vids in per_rank for v in vids)
        assert set(counts) == {f"v{i:03d}" for i in range(n)}  # every sample read
        assert sum(counts.values()) - n == world_size * num_batches * batch_size - n
        if n % (world_size * batch_size) == 0:  # no padding: exactly once, ranks disjoint
            assert set(counts.values()) == {1}
        # before wrapping to whole batches, the ranks' samples are disjoint except the
        # ceil(n / W) * W - n global padding samples
        firsts = [vids[: math.ceil(n / world_size)] for vids in per_rank]
        overlap = sum(collections.Counter(v for f in firsts for v in f).values()) - n
        assert overlap == math.ceil(n / world_size) * world_size - n
    # reshuffled each epoch
    a = train_batches(n, batch_size, 0, world_size, cfg.seed, 0)
    b = train_batches(n, batch_size, 0, world_size, cfg.seed, 1)
    assert [r.index for x in a for r in x] != [r.index for x in b for r in x]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_evaluation_sees_every_video_view_once(shards, world_size, backend):
    cfg = config(shards)
    loaders = [build_loader(cfg, "test", r, world_size, backend=backend) for r in range(world_size)]
    assert len({len(ld) for ld in loaders}) == 1
    seen = collections.Counter()
    for ld in loaders:
        batches = list(ld)
        assert len(batches) == len(ld)
        for batch in batches:
            assert batch["rgb"].shape[1:] == (4, 3, 24, 24) and batch["num_views"] == 2
            assert batch["view"].dtype == torch.int64
            seen.update(zip(batch["video_id"], batch["view"].tolist()))
    assert seen == {(f"v{12 + i:03d}", v): 1 for i in range(len(TEST_FRAMES)) for v in (0, 1)}


@pytest.mark.parametrize("mode,unused", [("appearance", "flow"), ("motion", "rgb")])
def test_single_stream_modes_leave_the_other_modality_none(shards, mode, unused):
    cfg = config(shards, **{"model.mode": mode})
    for backend in BACKENDS:
        batch = next(iter(build_loader(cfg, "train", 0, 1, backend=backend)))
        assert batch[unused] is None
        used = "rgb" if unused == "flow" else "flow"
        assert batch[used].shape[:2] == (2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_video_evaluation(shards, backend):
    cfg = config(shards)
    loader = build_loader(cfg, "test", 0, 1, backend=backend, whole_video=True)
    batches = list(loader)
    assert len(batches) == len(TEST_FRAMES) * 2
    # L=2: positions 1..10 of 12 frames have their whole flow stack
    assert frame_numbers(batches[0]["rgb"][0]).tolist() == list(range(1, 11))


@pytest.fixture
def damaged(shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    # every RGB frame of v005 a clip can use is garbage; the last train shard is cut in half
    for t in range(1, TRAIN_FRAMES[5]):
        replace_member(copy / "train-p000-00001.tar", f"v005.{rgb_member(t)}", b"not a jpeg")
    last = copy / "train-p000-00002.tar"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_samples_are_skipped_with_a_counted_warning(damaged, backend, caplog):
    cfg = config(damaged, **{"data.max_damaged_fraction": 0.5})
    with caplog.at_level(logging.WARNING):
        loader = build_loader(cfg, "train", 0, 1, backend=backend)
        assert "damaged shard" in caplog.text
        batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader) == 6
    assert all(b["rgb"].shape[0] == 2 for b in batches)
    videos = {v for b in batches for v in b["video_id"]}
    assert "v005" not in videos and "v011" not in videos  # v011 is past the truncation
    skipped = sum(b["skipped"] for b in batches)
    assert skipped == loader.skipped >= 2
    assert "skipping sample" in caplog.text and "not a complete JPEG" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_drops_a_damaged_video_and_counts_it(shards, tmp_path, backend, caplog):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    for t in range(1, TEST_FRAMES[1]):  # test video v013
        replace_member(copy / "test-p000-00000.tar", f"v013.{rgb_member(t)}", b"not a jpeg")
    # v013's two views fill two whole batches; 1 of 5 videos damaged
    cfg = config(copy, **{"eval.batch_size_per_worker": 1, "data.max_damaged_fraction": 0.2})
    with caplog.at_level(logging.WARNING):
        loader = build_loader(cfg, "test", 0, 1, backend=backend)
        batches = list(loader)
    assert len(batches) == len(loader) == 2 * len(TEST_FRAMES)
    seen = [(v, int(w)) for b in batches for v, w in zip(b["video_id"], b["view"])]
    expected = [(f"v{12 + i:03d}", w) for i in range(len(TEST_FRAMES)) for w in (0, 1)]
    assert seen == [item for item in expected if item[0] != "v013"]
    assert [b["rgb"].shape[0] for b in batches] == [1, 1, 0, 0] + [1] * 6
    assert sum(b["skipped"] for b in batches) == loader.skipped == 2
    assert "skipping test sample 1" in caplog.text


def test_parallel_workers_give_the_same_batches(shards):
    cfg = config(shards, **{"data.loader_workers": 2})
    serial = config(shards)
    for backend in BACKENDS:
        a = epoch_batches(build_loader(cfg, "train", 1, 2, backend=backend), 2)
        b = epoch_batches(build_loader(serial, "train", 1, 2, backend=backend), 2)
        assert [x["video_id"] for x in a] == [x["video_id"] for x in b]
        assert all(torch.equal(x["rgb"], y["rgb"]) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "fmt", ["webdataset", tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]
)
def test_tar_header_scan_matches_tarfile(shards, tmp_path, fmt):
    if fmt == "webdataset":
        path = shards / "train-p000-00000.tar"
    else:  # long names need GNU/pax records (ustar: the prefix field)
        path = tmp_path / "x.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name in ["a.json", "dir/" * 30 + "b.rgb.00000.jpg", "c.rgb.00001.jpg"]:
                info = tarfile.TarInfo(name)
                info.size = len(name)
                tar.addfile(info, io.BytesIO(name.encode()))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    members, damage = scan_tar_members(path)
    assert members == expected and damage is None
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: expected[-1][1] + 10])
    members, damage = scan_tar_members(cut)
    assert members == expected[:-1] and "runs past the end" in damage


def test_an_epoch_left_early_does_not_leak_into_the_next(shards):
    cfg = config(shards)
    for backend in BACKENDS:
        loader = build_loader(cfg, "train", 0, 1, backend=backend)
        loader.set_epoch(0)
        next(iter(loader))  # e.g. train.steps_per_epoch < len(loader)
        loader.set_epoch(1)
        fresh = build_loader(cfg, "train", 0, 1, backend=backend)
        assert [b["video_id"] for b in loader] == [b["video_id"] for b in epoch_batches(fresh, 1)]


def test_bad_arguments_give_clear_errors(shards, tmp_path):
    cfg = config(shards)
    with pytest.raises(ValueError, match="backend: got 'torch'"):
        build_loader(cfg, "train", 0, 1, backend="torch")
    with pytest.raises(ValueError, match="no split 'val'"):
        build_loader(cfg, "val", 0, 1)
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        build_loader(config(tmp_path), "train", 0, 1)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="dali_device is 'gpu'"):
            build_loader(config(shards, **{"data.dali_device": "gpu"}), "train", 0, 1, "dali")


def assert_same_clips(a: dict, b: dict) -> None:
    """CPU-loader batch ``a`` and DALI batch ``b``: same clips, pixels within decoder rounding."""
    assert a["video_id"] == b["video_id"] and torch.equal(a["label"], b["label"])
    assert a["skipped"] == b["skipped"]
    if "view" in a:
        assert torch.equal(a["view"], b["view"])
    assert a["rgb"].shape == b["rgb"].shape and a["flow"].shape == b["flow"].shape
    if a["rgb"].numel():
        assert torch.equal(frame_numbers(a["rgb"]), frame_numbers(b["rgb"]))
        rgb_bytes = (a["rgb"] - b["rgb"].float()).abs() * 255 * max(IMAGENET_STD)
        flow_bytes = (a["flow"] - b["flow"].float()).abs() * FLOW_SCALE
        assert rgb_bytes.max() <= 3 and rgb_bytes.mean() < 0.5
        assert flow_bytes.max() <= 3 and flow_bytes.mean() < 0.5


@pytest.mark.parametrize("workers", [0, 2])
def test_dali_matches_cpu_across_epochs_on_two_ranks_without_rebuilding(shards, workers):
    # Rank by rank: an epoch left after one batch (train.steps_per_epoch < len(loader)), the next
    # epoch, a jump to a later one (a resumed run), and three validations; one build per
    # modality for the whole life of each loader.
    cfg = config(shards, **{"data.loader_workers": workers})
    for rank in range(2):
        cpu = build_loader(cfg, "train", rank, 2, backend="cpu")
        dali = build_loader(cfg, "train", rank, 2, backend="dali")
        dali.set_epoch(0)
        first = next(iter(dali))
        assert_same_clips(epoch_batches(cpu, 0)[0], first)
        for epoch in (1, 2, 5, 3):
            pairs = zip(epoch_batches(cpu, epoch), epoch_batches(dali, epoch), strict=True)
            for a, b in pairs:
                assert_same_clips(a, b)
        assert dali.builds == 1
        cpu_eval = build_loader(cfg, "test", rank, 2, backend="cpu")
        dali_eval = build_loader(cfg, "test", rank, 2, backend="dali")
        expected = list(cpu_eval)
        for epoch in range(3):
            dali_eval.set_epoch(epoch)
            for a, b in zip(expected, dali_eval, strict=True):
                assert_same_clips(a, b)
        assert dali_eval.builds == 1


def test_packed_and_per_sample_hand_over_decode_identical_pixels(shards):
    cfg = config(shards)
    for split in ("train", "test"):
        packed = build_loader(cfg, split, 0, 1, backend="dali")
        per_sample = build_loader(cfg, split, 0, 1, backend="dali")
        per_sample.packed = False
        for a, b in zip(epoch_batches(packed, 1), epoch_batches(per_sample, 1), strict=True):
            assert a["video_id"] == b["video_id"]
            assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["flow"], b["flow"])


def test_packed_rows_hold_exactly_each_planned_member_then_zeros(shards):
    """The DALI workers' span reads (one preadv per run of neighbouring members, a flow field
    shared by overlapping stacks read once and copied) give every row exactly the bytes
    ``ShardIndex.read`` gives for that member, followed by zeros (what the decoder skips)."""
    from pipelines.loaders.clips import ClipSource
    from pipelines.loaders.dali import _read_fast

    cfg = config(shards)
    index = ShardIndex(shards, "train")
    source = ClipSource(cfg, index)
    overlapping = 0
    for epoch in (0, 1):
        for batch in train_batches(len(index), 4, 0, 1, cfg.seed, epoch):
            read = _read_fast(source, batch)
            assert read is not None
            clips = [source.read(request, request.index) for request in batch]
            # every RGB frame of the batch, then every flow field
            expected = [b for c in clips for b in c.rgb] + [b for c in clips for b in c.flow]
            fields = [[i for stack in c.plan.flow_indices for i in stack] for c in clips]
            overlapping += sum(len(f) - len(set(f)) for f in fields)
            assert len(read.jpegs) == len(expected)
            for row, length, blob in zip(read.jpegs, read.lengths, expected, strict=True):
                assert length == len(blob) and row[:length].tobytes() == blob
                assert not row[length:].any()
    assert overlapping > 0  # the copies were exercised


def test_vectorised_jpeg_check_never_accepts_what_check_jpeg_rejects():
    import numpy as np
    from loader_shards import jpeg

    from pipelines.loaders.dali import check_packed
    from pipelines.loaders.shard_reader import SampleError, check_jpeg

    good = jpeg(np.full((HEIGHT, WIDTH), 90, np.uint8))
    app = b"\xff\xe1\x00\x0e" + b"\xff\xc0" * 6  # an APP1 segment that contains SOF-like bytes
    cases = {
        "good": good,
        "colour": jpeg(np.zeros((HEIGHT, WIDTH, 3), np.uint8)),
        "fill bytes": good[:2] + b"\xff\xff" + good[2:],
        "app segment": good[:2] + app + good[2:],
        "other size": jpeg(np.zeros((HEIGHT + 8, WIDTH), np.uint8)),
        "no end marker": good[:-2],
        "truncated": good[: len(good) // 2],
        "no start marker": good[2:],
        "tiny": b"\xff\xd8\xff",
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "broken segment": good[:2] + b"\x00" + good[3:],
        "end marker early": good[:20] + b"\xff\xd9",
    }
    accepted = {}
    for name, blob in cases.items():
        try:
            check_jpeg(blob, HEIGHT, WIDTH, name)
            accepted[name] = True
        except SampleError:
            accepted[name] = False
    longest = max(len(b) for b in cases.values())
    packed = np.zeros((len(cases), longest + 1024), np.uint8)
    for row, blob in zip(packed, cases.values()):
        row[: len(blob)] = np.frombuffer(blob, np.uint8)
    lengths = np.array([len(b) for b in cases.values()])
    sizes = np.full(len(cases), HEIGHT), np.full(len(cases), WIDTH)
    fast = dict(zip(cases, check_packed(packed, lengths, *sizes).tolist()))
    assert fast == accepted
    assert accepted["good"] and accepted["fill bytes"] and accepted["app segment"]
    assert sum(accepted.values()) == 4
    # checking some rows only (the DALI workers skip rows that copy another): the same verdicts
    rows = np.arange(len(cases))[::-1][::2].copy()
    some = check_packed(packed, lengths[rows], sizes[0][rows], sizes[1][rows], rows=rows)
    assert some.tolist() == [list(accepted.values())[k] for k in rows]

# ------------------------------------------------------------------------------------------
# Index files, and the header scan for shards without one
# ------------------------------------------------------------------------------------------


def refs(index: ShardIndex) -> list:
    """What a ShardIndex found, comparable: per sample (key, label, frames, size, member table)."""
    return [None if r is None else (r.key, r.label, r.num_frames, r.height, r.width,
                                    r.members[..., :2].tolist())
            for r in index.samples]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a malformed header once sent the reader into an endless loop."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def without_index_files(shards, tmp_path):
    copy = tmp_path / "no-index"
    shutil.copytree(shards, copy)
    for index in copy.glob("*.idx"):
        index.unlink()
    return copy


def test_index_files_locate_every_member_as_tarfile_does(shards):
    tars = sorted(shards.glob("*.tar"))
    assert len(tars) == 5
    for path in tars:
        with tarfile.open(path) as tar:
            expected = [(m.name, m.offset_data, m.size, zlib.crc32(tar.extractfile(m).read()))
                        for m in tar if m.isfile()]
        index = path.with_name(path.name + ".idx")
        assert read_index_file(index, path.stat().st_size) == expected
        assert scan_tar_members(path) == ([m[:3] for m in expected], None)


def test_shards_without_index_files_read_the_same(shards, tmp_path, caplog):
    copy = without_index_files(shards, tmp_path)
    with caplog.at_level(logging.WARNING):
        for split in ("train", "test"):
            assert refs(ShardIndex(copy, split)) == refs(ShardIndex(shards, split))
    assert caplog.text == ""  # a shard made by another tool has no index: nothing to warn about


def _shift_offsets(data: dict) -> None:
    for member in data["members"]:
        member[1] += 512  # each offset now points into a header or the previous member's data


@pytest.mark.parametrize("damage, message", [
    ("not json", "unreadable index"),
    ("format", "format 'other/9', expected 'stresnet-shard-index/1'"),
    ("past the end", "is outside the 256000-byte tar"),
    ("offsets shifted", "no tar header for v000.json"),
    ("entry", "malformed entry"),
    ("tar truncated", "made for a tar of 256000 bytes, the tar has 128000"),
])
def test_an_index_that_does_not_fit_its_tar_is_named_and_the_headers_are_scanned(
    shards, tmp_path, caplog, damage, message
):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = copy / "train-p000-00000.tar"
    index = copy / "train-p000-00000.tar.idx"
    data = json.loads(index.read_text())
    assert data["tar_size"] == shard.stat().st_size == 256000
    change = {
        "format": lambda d: d.update(format="other/9"),
        "past the end": lambda d: d["members"][-1].__setitem__(2, 10**6),
        "offsets shifted": _shift_offsets,
        "entry": lambda d: d["members"][3].__setitem__(1, "1536"),
    }
    if damage == "not json":
        index.write_bytes(b"\x00{not json")
    elif damage == "tar truncated":
        shard.write_bytes(shard.read_bytes()[:128000])
    else:
        change[damage](data)
        index.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING), deadline(60):
        found = refs(ShardIndex(copy, "train"))
    assert message in caplog.text and str(index) in caplog.text
    assert "reading the tar headers of train-p000-00000.tar instead" in caplog.text
    expected = refs(ShardIndex(shards, "train"))
    if damage == "tar truncated":  # the header scan keeps the samples before the cut
        assert "damaged shard" in caplog.text
        assert found[0] == expected[0] and found[1][0] == "v001"  # v001 is cut: its later frames are missing
        assert found[2:4] == [None, None] and found[4:] == expected[4:]
    else:
        assert found == expected


def _set_size_field(data: bytearray, header: int, field: bytes, fix_checksum: bool) -> None:
    data[header + 124 : header + 136] = field
    if fix_checksum:
        data[header + 148 : header + 156] = b" " * 8
        data[header + 148 : header + 155] = b"%06o\0" % sum(data[header : header + 512])


@pytest.mark.parametrize("corruption, damage", [
    # issue 13: `printf '00' | dd of=SHARD bs=1 seek=512 conv=notrunc` used to hang the loaders:
    # it zeroes the length of the pax record in front of the first member
    ("dd 00 at byte 512", "invalid pax record at byte 512"),
    ("size field zeroed", "invalid header at byte 1024"),
    ("size field zeroed, checksum fixed", "invalid header at byte 1536"),
    ("size field not octal", "invalid size field in the header at byte 1024"),
])
def test_corrupt_headers_end_the_scan_with_the_damage_named(shards, tmp_path, caplog, corruption, damage):
    copy = without_index_files(shards, tmp_path)
    shard = copy / "train-p000-00000.tar"
    data = bytearray(shard.read_bytes())
    assert data[512:516] == b"13 m" and data[1024:1028] == b"v000"  # pax record, then the header
    if corruption == "dd 00 at byte 512":
        data[512:514] = b"00"
    elif corruption == "size field not octal":
        _set_size_field(data, 1024, b"99999999999\0", fix_checksum=True)
    else:
        _set_size_field(data, 1024, b"00000000000\0", fix_checksum=corruption.endswith("fixed"))
    shard.write_bytes(bytes(data))
    with deadline(60):
        members, found = scan_tar_members(shard)
        assert found == damage
        assert all(size == 0 for _, _, size in members)  # nothing after the damage
        # the loader goes on without the shard's samples and says why
        with caplog.at_level(logging.WARNING):
            loader = build_loader(config(copy, **{"data.max_damaged_fraction": 0.5}), "train", 0,
                                  1, backend="cpu")
            batches = epoch_batches(loader, 0)
    assert f"damaged shard ({damage})" in caplog.text
    assert len(batches) == len(loader) == 6
    assert not {v for b in batches for v in b["video_id"]} & {"v000", "v001", "v002", "v003"}


def test_a_shard_with_its_index_ignores_damage_outside_its_members(shards, tmp_path, caplog):
    """The same dd on a shard with an index file: the pax record is not part of any member."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = copy / "train-p000-00000.tar"
    data = bytearray(shard.read_bytes())
    data[512:514] = b"00"
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING), deadline(60):
        assert refs(ShardIndex(copy, "train")) == refs(ShardIndex(shards, "train"))
    assert caplog.text == ""


def test_indexed_samples_keep_where_their_index_lines_are_not_their_member_tables(shards):
    """Memory per rank grows with the videos, not the members (benchmarks/scale.py): a sample of
    a shard with an index file reads its table from its lines of that file when asked."""
    index = ShardIndex(shards, "train")
    assert all(ref._members is None for ref in index.samples)
    tables = sum(ref.members.nbytes for ref in index.samples)  # read back from the index lines
    assert len(pickle.dumps(index)) < tables  # what each DALI worker receives
    copy = pickle.loads(pickle.dumps(index))
    assert refs(copy) == refs(index)
    data = copy.read(1, ["rgb.00002.jpg", "flow_y.00001.jpg"])
    assert data == index.read(1, ["rgb.00002.jpg", "flow_y.00001.jpg"])
    assert index.longest_member == max(int(ref.members[:, :, 1].max()) for ref in index.samples)


def test_an_index_in_another_layout_is_used_with_its_tables_in_memory(shards, tmp_path, caplog):
    """An index file that is not one member per line (another tool's JSON writer) is as valid:
    its samples keep their tables, and read the same."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    for index in copy.glob("*.idx"):
        index.write_text(json.dumps(json.loads(index.read_text())))  # one line
    with caplog.at_level(logging.WARNING):
        found = ShardIndex(copy, "train")
    assert caplog.text == ""
    assert all(ref._members is not None for ref in found.samples)
    assert refs(found) == refs(ShardIndex(shards, "train"))


def test_an_index_file_changed_after_indexing_fails_its_samples_by_name(shards, tmp_path):
    """A sample's member lines are read from the index file the loader checked, or not at all."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    index = ShardIndex(copy, "train")
    path = copy / "train-p000-00000.tar.idx"
    path.write_text(path.read_text() + " ")
    with pytest.raises(SampleError, match=r"train-p000-00000.tar.idx: changed since the loader"):
        index.read(0, ["rgb.00000.jpg"])
    assert index.read(4, ["rgb.00000.jpg"])  # another shard's index is untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_frame_views_are_the_whole_frame_and_its_mirror(shards, backend):
    """``full_frame``: 32x40 frames at input size 24 stay 32x40 (inside [24, 48]), uncropped."""
    cfg = config(shards, **{"sampling.test_crops": "full_frame"})
    batches = list(build_loader(cfg, "test", 0, 1, backend=backend))
    assert sum(len(b["video_id"]) for b in batches) == len(TEST_FRAMES) * 2
    for batch in batches:
        assert batch["num_views"] == 2
        assert batch["rgb"].shape[1:] == (4, 3, HEIGHT, WIDTH)
        assert batch["flow"].shape[1:] == (4, 4, HEIGHT, WIDTH)
    by_view = {(v, int(view)): (b["rgb"][i].cpu(), b["flow"][i].cpu())
               for b in batches for i, (v, view) in enumerate(zip(b["video_id"], b["view"]))}
    rgb0, flow0 = by_view[("v012", 0)]
    rgb1, flow1 = by_view[("v012", 1)]
    torch.testing.assert_close(rgb1, rgb0.flip(-1))  # view 1 = the mirror
    # x -> 255 - x: one byte off an exact negation around 128
    torch.testing.assert_close(flow1[:, 0::2], -flow0[:, 0::2].flip(-1), atol=1.01 / FLOW_SCALE, rtol=0)


def test_full_frame_dali_and_cpu_agree(shards):
    cfg = config(shards, **{"sampling.test_crops": "full_frame"})
    cpu, dali = (list(build_loader(cfg, "test", 0, 1, backend=b)) for b in BACKENDS)
    for a, b in zip(cpu, dali, strict=True):
        assert a["video_id"] == b["video_id"] and torch.equal(a["view"], b["view"])
        assert a["rgb"].shape == b["rgb"].shape
        assert ((a["rgb"] - b["rgb"].cpu()).abs() * 255 * max(IMAGENET_STD)).max() <= 3
        assert ((a["flow"] - b["flow"].cpu()).abs() * FLOW_SCALE).max() <= 3


def test_full_frame_batches_of_different_sizes_are_cut_to_the_smallest(shards):
    from pipelines.loaders.clips import ClipSource
    from pipelines.loaders.schedule import ClipRequest

    cfg = config(shards, **{"sampling.test_crops": "full_frame"})
    source = ClipSource(cfg, ShardIndex(cfg.data.shards, "test"))
    # pretend sample 1 is smaller: 30 x 36
    smaller = copy.copy(source.index.ref(1))
    smaller.height, smaller.width = 30, 36
    source.index.ref = lambda i, _orig=source.index.ref: smaller if i == 1 else _orig(i)
    batch = source.with_frame_limits([ClipRequest(0, view=0), ClipRequest(1, view=1)])
    assert [r.limit for r in batch] == [(30, 36), (30, 36)]
    plan = source.plan(batch[0], 0)
    assert (plan.box.w, plan.box.h) == (36, 30) and plan.size == (30, 36)
    train = [ClipRequest(0), ClipRequest(1)]
    assert source.with_frame_limits(train) == train


def test_median_centring_uses_the_whole_frame_not_the_crop():
    """The authors subtract each flow image's median over the whole frame, before cropping
    (``cnn_get_im_flow_batch.m``): a crop of the frame's right half is centred on the frame's
    median, not its own."""
    from pipelines.loaders.clips import EncodedClip, decode_clip
    from loader_shards import jpeg
    from stresnet.sampling import ClipPlan, CropBox, normalize_clip

    image = np.zeros((32, 40), np.uint8)
    image[:, :24] = 100  # 60 % of the frame: the frame's median is 100
    image[:, 24:] = 200  # the crop below sees only this
    flow_bytes = [jpeg(image), jpeg(image)]  # L=1: x and y
    plan = ClipPlan((0,), ((0,),), CropBox(24, 0, 16, 32), False, (8, 8))
    clip = EncodedClip(0, plan, [], flow_bytes, 0)
    _, flow, medians = decode_clip(clip, medians=True)
    assert flow.shape == (1, 8, 8, 2)
    assert medians.tolist() == [[100, 100]]
    _, out = normalize_clip(None, torch.from_numpy(flow)[None], torch.tensor([False]), "median",
                            torch.from_numpy(medians)[None])
    assert torch.allclose(out, torch.full_like(out, (200 - 100) / FLOW_SCALE), atol=2 / FLOW_SCALE)
    # mirrored: x becomes 255 - x, and its centre 255 - median
    _, flipped = normalize_clip(None, torch.from_numpy(flow)[None], torch.tensor([True]), "median",
                                torch.from_numpy(medians)[None])
    torch.testing.assert_close(flipped[:, :, 0], -out[:, :, 0].flip(-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="backend 'cpu' only"):
        build_loader(load_config(None, ["sampling.flow_center=median"]), "train", 0, 1, "dali")
