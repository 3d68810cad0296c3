"""Random access to the samples of one split's shards: which bytes of which tar hold each member.

Both loaders read clips through ``ShardIndex``: at start-up it walks the tar headers of every
shard of the split (tarfile seeks over member data, so this reads ~512 bytes per member) and
records where each member's bytes are. A clip then reads only its selected members, about a fifth
of a video's JPEGs for a stage-1 clip, instead of streaming whole videos.

Damaged input is recorded, not fatal: a truncated shard keeps the samples before the damage, and
samples the manifest promises but the tar lacks are ``None``; reading them raises ``SampleError``,
which the loaders count and skip.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.shard_format import flow_members, read_manifest, rgb_member

log = logging.getLogger(__name__)


class SampleError(Exception):
    """One sample cannot be used (missing member, corrupt JPEG, truncated shard)."""


@dataclass
class SampleRef:
    """Where one video's members are: ``members[name] = (offset, size)`` in ``path``."""

    path: str
    key: str
    video_id: str
    label: int
    num_frames: int
    height: int
    width: int
    members: dict[str, tuple[int, int]]


class ShardIndex:
    """The samples of one split in manifest order (shard order, then tar order)."""

    def __init__(self, folder: str | Path, split: str):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        splits = manifest.get("splits", {})
        if split not in splits:
            raise ValueError(
                f"{self.folder / 'manifest.json'}: no split {split!r}; "
                f"the shards hold {sorted(splits)}"
            )
        self.split = split
        self.classes: list[str] = list(manifest.get("classes", []))
        self.samples: list[SampleRef | None] = []
        for shard in splits[split]["shards"]:
            path = self.folder / shard["name"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in the manifest is missing")
            found = _index_tar(path)
            expected = int(shard["samples"])
            if len(found) < expected:
                log.warning(
                    "%s: manifest lists %d samples, the tar holds %d; the rest are skipped",
                    path, expected, len(found),
                )
            self.samples += found[:expected] + [None] * (expected - len(found))

    def __len__(self) -> int:
        return len(self.samples)

    def ref(self, index: int) -> SampleRef:
        """The sample at ``index``, or ``SampleError`` if its shard is damaged there."""
        ref = self.samples[index]
        if ref is None:
            raise SampleError(f"{self.split} sample {index}: not readable (truncated shard)")
        return ref

    def read(self, index: int, names: list[str]) -> dict[str, bytes]:
        """The bytes of the members ``names`` (e.g. ``rgb.00003.jpg``) of sample ``index``."""
        ref = self.ref(index)
        missing = [n for n in names if n not in ref.members]
        if missing:
            raise SampleError(f"{ref.path}: sample {ref.key} has no member {missing[0]}")
        out: dict[str, bytes] = {}
        with open(ref.path, "rb") as f:
            for name in sorted(set(names), key=lambda n: ref.members[n][0]):
                offset, size = ref.members[name]
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise SampleError(f"{ref.path}: member {ref.key}.{name} is truncated")
                out[name] = data
        return out


def clip_member_names(positions, flow_stacks, rgb: bool, flow: bool) -> tuple[list, list]:
    """Member names of a clip: one RGB frame per position and, per position, the flow stack
    interleaved x1, y1, x2, y2, ... (the motion stream's channel order)."""
    rgb_names = [rgb_member(p) for p in positions] if rgb else []
    flow_names = [n for stack in flow_stacks for i in stack for n in flow_members(i)] if flow else []
    return rgb_names, flow_names


def check_jpeg(data: bytes, height: int, width: int, what: str) -> None:
    """Cheap validity check before decoding: JPEG markers present and the frame size as recorded.

    DALI's decoder cannot skip a bad image (it invalidates the pipeline), so both loaders check
    headers first and skip the same samples. Damage inside the entropy-coded data is not caught
    here; libjpeg decodes it to wrong pixels.
    """
    if len(data) < 4 or data[:2] != b"\xff\xd8" or b"\xff\xd9" not in data[-16:]:
        raise SampleError(f"{what}: not a complete JPEG (start/end markers missing)")
    size = _jpeg_size(data)
    if size != (height, width):
        raise SampleError(f"{what}: JPEG is {size}, expected {(height, width)}")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the first start-of-frame marker, or None."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        i += 2 + length
    return None


def _index_tar(path: Path) -> list[SampleRef | None]:
    """Walk the headers of one shard; stop (with a warning) at the first damage. A sample that
    is found but unusable stays in the list as None, so later samples keep their index."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    file_size = os.path.getsize(path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.rpartition("/")[2].partition(".")
                if member.offset_data + member.size > file_size:
                    raise tarfile.ReadError(f"member {member.name} runs past the end of the file")
                groups.setdefault(key, {})[suffix] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError, OSError) as err:
        log.warning("%s: damaged shard (%s); using the samples before the damage", path, err)

    samples: list[SampleRef | None] = []
    with open(path, "rb") as f:
        for key, members in groups.items():
            if "json" not in members:
                log.warning("%s: sample %s has no json member; skipped", path, key)
                samples.append(None)
                continue
            offset, size = members.pop("json")
            f.seek(offset)
            try:
                meta = json.loads(f.read(size))
            except ValueError as err:
                log.warning("%s: sample %s has unreadable json (%s); skipped", path, key, err)
                samples.append(None)
                continue
            # The frame size comes from the first frame's JPEG header: it is what the crops are
            # cut from, whatever the json says about the source video.
            size = None
            if rgb_member(0) in members:
                offset, length = members[rgb_member(0)]
                f.seek(offset)
                size = _jpeg_size(f.read(min(length, 65536)))
            if size is None:
                log.warning("%s: sample %s has no readable first frame; skipped", path, key)
                samples.append(None)
                continue
            samples.append(
                SampleRef(
                    path=str(path), key=key, video_id=str(meta.get("video_id", key)),
                    label=int(meta["label"]), num_frames=int(meta["num_frames"]),
                    height=size[0], width=size[1], members=members,
                )
            )
    return samples
