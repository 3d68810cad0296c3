"""Fuzz the shard reader (issue 13): random truncations and byte flips of a small shard.

Seeded and bounded (``CASES`` damaged copies, each under a ``deadline``). For every case the
reader must

- end: no case runs longer than the deadline (a zeroed size field once looped forever);
- fail only by name: reading a sample raises nothing but ``SampleError`` (what the loaders count
  and skip), clip building nothing but ``SampleError``;
- never pass changed bytes on uncounted: a member it returns is byte-for-byte the original's,
  and so are the sample's key, label and frame count.

The one documented exception (docs/reliability.md): a shard WITHOUT its index file has no
checksums, so a flip inside a member's data is passed on as it is (JPEG decoding may or may not
notice). The test checks that every changed member it gets there overlaps a flipped byte.
"""

from __future__ import annotations

import random
import shutil
import tarfile

import pytest

from loader_shards import config, write_shards
from pipelines.loaders.clips import ClipSource, decode_clip
from pipelines.loaders.schedule import ClipRequest
from pipelines.loaders.shard_reader import SampleError, ShardIndex
from test_loaders import deadline

CASES = 48
SEED = 13
SHARD = "train-p000-00000.tar"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """Four 6-frame videos in one shard with its index; their members' bytes and places."""
    folder = write_shards(tmp_path_factory.mktemp("fuzz"), {"train": [6, 6, 6, 6]}, per_shard=4)
    members: dict[str, dict[str, bytes]] = {}
    where: dict[tuple[str, str], tuple[int, int]] = {}
    with tarfile.open(folder / SHARD) as tar:
        for m in tar:
            key, _, name = m.name.partition(".")
            members.setdefault(key, {})[name] = tar.extractfile(m).read()
            where[key, name] = (m.offset_data, m.offset_data + m.size)
    index = ShardIndex(folder, "train")
    meta = [(r.key, r.label, r.num_frames) for r in index.samples]
    return folder, members, where, meta


def damage(data: bytes, rng: random.Random) -> tuple[bytes, list[int]]:
    """A truncated copy (no flips) or one with 1-8 bytes changed (their positions)."""
    if rng.random() < 0.4:
        return data[: rng.randrange(len(data))], []
    out = bytearray(data)
    flips = sorted(rng.sample(range(len(out)), rng.randint(1, 8)))
    for i in flips:
        out[i] ^= rng.randrange(1, 256)
    return bytes(out), flips


@pytest.mark.parametrize("case", range(CASES))
def test_damaged_shard_never_hangs_crashes_or_passes_changed_bytes_uncounted(original, tmp_path, case):
    folder, members, where, meta = original
    rng = random.Random(SEED * 1000 + case)
    copy = tmp_path / "shards"
    shutil.copytree(folder, copy)
    indexed = case % 2 == 0  # odd cases: a shard made by another tool (headers scanned)
    if not indexed:
        (copy / (SHARD + ".idx")).unlink()
    data, flips = damage((folder / SHARD).read_bytes(), rng)
    (copy / SHARD).write_bytes(data)

    def flipped(key: str, name: str) -> bool:
        start, end = where[key, name]
        return any(start <= i < end for i in flips)

    counted = whole = 0
    with deadline(30):
        index = ShardIndex(copy, "train")
        assert len(index) == len(meta)  # the manifest's count: damaged samples stay as None
        for i, (key, label, frames) in enumerate(meta):
            try:
                ref = index.ref(i)
            except SampleError:
                counted += 1
                continue
            if (ref.key, ref.label, ref.num_frames) != (key, label, frames):
                assert not indexed and flipped(key, "json"), f"sample {i}: metadata changed uncounted"
                continue
            for name, expected in members[key].items():
                if name == "json":
                    continue
                try:
                    got = index.read(i, [name])[name]
                except SampleError:
                    counted += 1
                    continue
                if got != expected:
                    assert not indexed and flipped(key, name), f"{key}.{name}: changed bytes uncounted"
                else:
                    whole += 1

        # The clip layer on top: every evaluation view and a training clip per sample either
        # build or raise the named error.
        cfg = config(copy, **{"sampling.test_positions": 2, "data.max_damaged_fraction": 1.0})
        source = ClipSource(cfg, index)
        requests = [ClipRequest(i, view=v) for i in range(len(index)) for v in range(2)]
        for request in requests:
            try:
                source.load(request, lambda clip: decode_clip(clip))
            except SampleError:
                pass
    if not flips and len(data) > 0:
        assert counted + whole > 0  # a truncated shard still reads or counts its members
