"""Reading shards: random access to the samples of one split, member by member.

Both loaders read clips through ``ShardIndex``: at start-up it learns where each member's bytes
are in every shard of the split and keeps that compactly (a NumPy array per video: UCF101 has ~7
million members). A clip then reads only its selected members, about a fifth of a video's JPEGs
for a stage-1 clip, instead of streaming whole videos.

Where the members are comes from the shard's index file ``NAME.tar.idx``, written beside it by
the shard writer (``pipelines.shard_writer``). A shard without one (made by another tool), or
whose index does not match the tar (``ShardIndexError``: other size, an entry outside the file,
unreadable JSON), is read by ``scan_tar_members``, a minimal tar header scan.

Damaged input is recorded, not fatal: a truncated or corrupt shard keeps the samples before the
damage, and samples the manifest promises but the tar lacks are ``None``; reading them raises
``SampleError``, which the loaders count and skip. Index files carry each member's CRC-32: a
member whose bytes changed since the shard was written raises ``SampleError`` too (a shard read
by its headers has no checksums: damage inside its members' data shows only where the JPEG
decoder notices it). Nothing here loops on malformed bytes: every step of the header scan moves
forward by at least one 512-byte block.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.shard_format import INDEX_FORMAT, flow_members, index_name, read_manifest, rgb_member

log = logging.getLogger(__name__)


class SampleError(Exception):
    """One sample cannot be used (missing member, corrupt JPEG, truncated shard)."""


class DamagedShardsError(ValueError):
    """More of a split is damaged than ``data.max_damaged_fraction`` allows."""


class ShardIndexError(ValueError):
    """A shard's index file cannot be used for its tar (the tar is then scanned instead)."""


# The per-frame members of a sample, in the order of the rows of ``SampleRef.members``.
FRAME_KINDS = ("rgb", "flow_x", "flow_y")


class SampleRef:
    """One video of the split: where it is, what it is (label, frames, frame size) and where its
    members are in ``path``: ``members[k, i] = (offset, size, crc32)`` of frame ``i`` of kind
    ``FRAME_KINDS[k]`` (``rgb.{i:05d}.jpg``, ...); offset -1 where there is none, crc32 -1 where
    it is not known (no index file).

    ``members`` of a sample whose shard has an index file is not kept in memory: it is read from
    the sample's lines of that file each time it is asked for (``_IndexLines``), so a rank holds
    ~1 KB per video instead of ~24 bytes per member (UCF101: ~7 M members, a
    Kinetics-400-sized split ~216 M). Ask once per clip. Samples of shards read by their tar
    headers (no index file) keep their table.
    """

    __slots__ = ("path", "key", "video_id", "label", "num_frames", "height", "width",
                 "_members", "_lines")

    def __init__(self, path: str, key: str, video_id: str, label: int, num_frames: int,
                 height: int, width: int, members: np.ndarray | None = None,
                 lines: "_IndexLines | None" = None):
        if (members is None) == (lines is None):
            raise ValueError("SampleRef needs its member table or the index lines to read it from")
        self.path, self.key, self.video_id = path, key, video_id
        self.label, self.num_frames, self.height, self.width = label, num_frames, height, width
        self._members, self._lines = members, lines

    def __getstate__(self):
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state):
        for name, value in zip(self.__slots__, state):
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"SampleRef({self.path!r}, key={self.key!r}, label={self.label}, frames={self.num_frames})"

    @property
    def members(self) -> np.ndarray:
        """(len(FRAME_KINDS), frames, 3) int64; ``SampleError`` if the index file changed or
        cannot be read since the loader was built."""
        if self._members is not None:
            return self._members
        return self._lines.table(self.key)

    def locate(self, name: str) -> tuple[int, int, int] | None:
        """(offset, size, crc32 or -1) of member ``name`` such as ``flow_x.00012.jpg``, None if
        absent."""
        return _locate(self.members, name)


def _locate(table: np.ndarray, name: str) -> tuple[int, int, int] | None:
    kind, _, rest = name.partition(".")
    number = rest.partition(".")[0]
    if kind not in FRAME_KINDS or not _is_number(number):
        return None
    i = int(number)
    if i >= table.shape[1] or table[FRAME_KINDS.index(kind), i, 0] < 0:
        return None
    offset, size, crc = table[FRAME_KINDS.index(kind), i]
    return int(offset), int(size), int(crc)


@dataclass(frozen=True)
class _IndexFile:
    """An index file as the loader found it: a sample's lines are read only while it is the
    same file (size and modification time)."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)  # one per video: slots keep it at ~70 bytes
class _IndexLines:
    """Where one sample's members are listed in its shard's index file: bytes ``start..end``,
    ``count`` lines of ``[name, offset, size, crc32]`` (the writer puts one member per line)."""

    file: _IndexFile
    start: int
    end: int
    count: int

    def table(self, key: str) -> np.ndarray:
        path = self.file.path
        try:
            stat = os.stat(path)
            if (stat.st_size, stat.st_mtime_ns) != (self.file.size, self.file.mtime_ns):
                raise SampleError(f"{path}: changed since the loader read it; rebuild the loader")
            with open(path, "rb") as f:
                f.seek(self.start)
                raw = f.read(self.end - self.start)
            entries = json.loads(b"[" + raw.rstrip(b",") + b"]")
        except OSError as err:
            raise SampleError(f"{path}: cannot read the members of {key} ({err})") from None
        except ValueError as err:
            raise SampleError(f"{path}: the lines of {key} are not JSON ({err})") from None
        frames = []
        prefix = key + "."
        for entry in entries:
            try:
                name, offset, size, *crc = entry
                name = name.rpartition("/")[2]
                ok = name.startswith(prefix)
            except (TypeError, ValueError, AttributeError):
                ok = False
            if not ok or len(entries) != self.count:
                raise SampleError(f"{path}: the lines of {key} changed since the loader read them")
            frame = _frame_entry(name[len(prefix):], offset, size, crc[0] if crc else -1)
            if frame is not None:
                frames.append(frame)
        return _frame_table(frames)


def _frame_entry(suffix: str, offset: int, size: int, crc: int) -> tuple | None:
    """(kind row, frame number, offset, size, crc) of a per-frame member such as
    ``flow_x.00012.jpg``, None for any other member."""
    kind, _, rest = suffix.partition(".")
    number = rest.partition(".")[0]
    if kind in FRAME_KINDS and _is_number(number):
        return FRAME_KINDS.index(kind), int(number), offset, size, crc
    return None


def _frame_table(frames: list[tuple]) -> np.ndarray:
    table = np.full((len(FRAME_KINDS), max([f[1] for f in frames], default=-1) + 1, 3), -1,
                    dtype=np.int64)
    if frames:
        k, i, *where = zip(*frames)
        table[list(k), list(i)] = np.array(where, dtype=np.int64).T
    return table


class ShardIndex:
    """The samples of one split in manifest order (shard order, then tar order).

    Samples that cannot be read (a listed shard that is missing, the part of a shard past its
    damage, a sample without readable json or first frame) are ``None``, each shard with a
    warning. With ``max_damaged_fraction``, more of them than that fraction of the split raises
    ``DamagedShardsError`` (the skip policy, docs/reliability.md).
    """

    def __init__(self, folder: str | Path, split: str, max_damaged_fraction: float | None = None):
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
        self.damaged_shards: list[str] = []  # shard names with unreadable samples
        self.longest_member = 0  # bytes of the split's largest frame JPEG (DALI's buffer hint)
        with _cyclic_gc_paused():
            self._add_shards(splits[split]["shards"])
        self.unreadable = sum(ref is None for ref in self.samples)
        if max_damaged_fraction is not None:
            check_damaged(self.unreadable, len(self.samples), max_damaged_fraction,
                          f"{self.folder}: split {split!r}", "unreadable when indexed",
                          self.damaged_shards)

    def _add_shards(self, shards: list[dict]) -> None:
        for shard in shards:
            path = self.folder / shard["name"]
            expected = int(shard["samples"])
            if not path.is_file():
                log.warning("%s: shard listed in the manifest is missing; its %d samples are "
                            "skipped", path, expected)
                self.samples += [None] * expected
                self.damaged_shards.append(shard["name"])
                continue
            found, longest = _index_shard(path)
            self.longest_member = max(self.longest_member, longest)
            if len(found) < expected:
                log.warning(
                    "%s: manifest lists %d samples, the tar holds %d; the rest are skipped",
                    path, expected, len(found),
                )
            found = found[:expected] + [None] * (expected - len(found))
            if None in found:
                self.damaged_shards.append(shard["name"])
            self.samples += found

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
        table = ref.members
        where = {}
        for name in names:
            where[name] = _locate(table, name)
            if where[name] is None:
                raise SampleError(f"{ref.path}: sample {ref.key} has no member {name}")
        out: dict[str, bytes] = {}
        with open(ref.path, "rb") as f:
            for name in sorted(where, key=lambda n: where[n][0]):
                offset, size, crc = where[name]
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise SampleError(f"{ref.path}: member {ref.key}.{name} is truncated")
                if crc >= 0 and zlib.crc32(data) != crc:
                    raise SampleError(
                        f"{ref.path}: member {ref.key}.{name} is corrupt (CRC-32 differs from "
                        "the index file's)"
                    )
                out[name] = data
        return out


def check_damaged(damaged: int, total: int, max_fraction: float, where: str, how: str,
                  shards: list[str] = ()) -> None:
    """The skip policy: ``DamagedShardsError`` when ``damaged`` of ``total`` samples is more
    than ``max_fraction`` of them."""
    if damaged and damaged > max_fraction * total:
        named = f" (damaged or missing shards: {', '.join(shards[:5])}{', ...' if len(shards) > 5 else ''})" if shards else ""
        raise DamagedShardsError(
            f"{where}: {damaged} of {total} samples {how}{named}, more than "
            f"data.max_damaged_fraction={max_fraction:g} allows; re-make the damaged shards with "
            f"`stresnet shards` (delete them first), or raise data.max_damaged_fraction to train "
            f"on the rest"
        )


@contextmanager
def _cyclic_gc_paused():
    """Index files parse into many small lists (no reference cycles); the allocation count alone
    would trigger full collections that scan the whole heap (torch's included) for nothing,
    which measured as up to half of the start-up time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def clip_member_names(positions, flow_stacks, rgb: bool, flow: bool) -> tuple[list, list]:
    """Member names of a clip: one RGB frame per position and, per position, the flow stack
    interleaved x1, y1, x2, y2, ... (the motion stream's channel order)."""
    rgb_names = [rgb_member(p) for p in positions] if rgb else []
    flow_names = []
    if flow:
        flow_names = [name for stack in flow_stacks for i in stack for name in flow_members(i)]
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


# SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
_START_OF_FRAME = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


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
        if marker in _START_OF_FRAME:
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            return height, int.from_bytes(data[i + 7 : i + 9], "big")
        i += 2 + length
    return None


def read_index_file(index: Path, tar_size: int) -> list[tuple[str, int, int, int]]:
    """The members (name, data offset, size, crc32 or -1 in an index without checksums) listed
    in index file ``index``, checked against the tar's size ``tar_size``; ``ShardIndexError``
    naming the file and the problem when they cannot be used."""
    return _read_index(index, tar_size)[0]


def _read_index(index: Path, tar_size: int) -> tuple[list[tuple[str, int, int, int]], bytes]:
    """``read_index_file`` and the file's bytes."""
    try:
        raw = index.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as err:
        raise ShardIndexError(f"{index}: unreadable index ({err})") from None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ShardIndexError(f"{index}: format {found!r}, expected {INDEX_FORMAT!r}")
    if data.get("tar_size") != tar_size:
        raise ShardIndexError(
            f"{index}: made for a tar of {data.get('tar_size')} bytes, the tar has {tar_size} "
            "(changed or truncated since)"
        )
    members = data.get("members")
    if not isinstance(members, list):
        raise ShardIndexError(f"{index}: no member list")
    out, end = [], 0
    for entry in members:
        try:
            name, offset, size, *crc = entry
            crc = crc[0] if len(crc) == 1 else (-1 if not crc else None)
            ok = (isinstance(name, str) and type(offset) is int and type(size) is int  # noqa: E721
                  and type(crc) is int and -1 <= crc < 2**32)  # noqa: E721
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ShardIndexError(f"{index}: malformed entry {str(entry)[:80]}")
        # Members follow each other, each after at least one 512-byte header.
        if offset < end + 512 or size < 0 or offset + size > tar_size:
            raise ShardIndexError(
                f"{index}: member {name} at bytes {offset}..{offset + size} is outside the "
                f"{tar_size}-byte tar or overlaps the previous member"
            )
        end = offset + size
        out.append((name, offset, size, crc))
    return out, raw


def _index_shard(path: Path) -> tuple[list[SampleRef | None], int]:
    """The samples of one shard, in tar order, from its index file or, without a usable one, its
    tar headers up to the first damage (with a warning), and its largest frame member's size. A
    sample that is found but unusable stays in the list as None, so later samples keep their
    index."""
    index = path.with_name(index_name(path.name))
    if index.is_file():
        try:
            stat = index.stat()
            members, raw = _read_index(index, os.path.getsize(path))
            lines = _member_lines(raw, len(members))
            file = _IndexFile(str(index), stat.st_size, stat.st_mtime_ns)
            return _samples(path, members, index, file, lines)
        except ShardIndexError as err:
            log.warning("%s; reading the tar headers of %s instead", err, path.name)
    members, damage = scan_tar_members(path)
    if damage:
        log.warning("%s: damaged shard (%s); using the samples before the damage", path, damage)
    return _samples(path, members, None, None, None)


def _member_lines(raw: bytes, count: int) -> np.ndarray | None:
    """Byte offsets of the lines of an index file written one member per line (as the shard
    writer does: a head line, ``count`` member lines, the closing line): member ``j`` is
    ``raw[starts[j]:starts[j + 1] - 1]``. None for any other layout (the members are then kept
    in memory)."""
    newlines = np.flatnonzero(np.frombuffer(raw, np.uint8) == 0x0A)
    if len(newlines) != count + 2 or not raw.endswith(b"\n]}\n"):
        return None
    return newlines[: count + 1] + 1


def _samples(path: Path, members: list[tuple], index: Path | None, file: _IndexFile | None,
             lines: np.ndarray | None) -> tuple[list, int]:
    """Group ``members`` by sample key and read each sample's json and first-frame header.
    With ``index`` (the members came from that index file) the tar header in front of each json
    member is checked too: a cheap proof that the index describes this tar. With ``lines``
    (where each member's line starts in that file) a sample whose members are consecutive lines
    keeps only where they are (``_IndexLines``), not its member table."""
    groups = _consecutive_groups(members) if lines is not None else None
    if groups is None:
        groups = _groups(members)
    longest = max((g["longest"] for g in groups.values()), default=0)

    samples: list[SampleRef | None] = []
    path_text = str(path)  # one string per shard, shared by its samples
    with open(path, "rb") as f:
        for key, group in groups.items():
            where = None
            if "frames" not in group:
                # consecutive members (WebDataset's layout): lines first .. first+count-1,
                # without the newline after the last
                first, count = group["first"], group["count"]
                where = _IndexLines(file, int(lines[first]), int(lines[first + count]) - 1, count)
            samples.append(_sample(path_text, f, key, group, index, where))
    return samples, longest


def _groups(members: list[tuple]) -> dict[str, dict]:
    """key -> {"json": (offset, size, crc), "frames": [(k, i, offset, size, crc)], "rgb0":
    (offset, size) of frame rgb 0, "longest": its largest frame member} of any member list."""
    groups: dict[str, dict] = {}
    for name, offset, size, *crc in members:  # (name, offset, size[, crc32])
        crc = crc[0] if crc else -1
        key, _, suffix = name.rpartition("/")[2].partition(".")
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"json": None, "frames": [], "rgb0": None, "longest": 0}
        if suffix == "json":
            group["json"] = (offset, size, crc)
            continue
        frame = _frame_entry(suffix, offset, size, crc)
        if frame is not None:
            group["frames"].append(frame)
            group["longest"] = max(group["longest"], size)
            if frame[0] == 0 and frame[1] == 0:
                group["rgb0"] = (offset, size)
    return groups


def _consecutive_groups(members: list[tuple]) -> dict[str, dict] | None:
    """The groups of an index whose samples' members are consecutive (WebDataset's layout),
    without the per-frame table: key -> {"json", "rgb0", "longest", "first": the place of its
    first member in ``members``, "count": its members}. None for any other member list (a key
    that comes back, a directory in a name, an RGB frame 0 not named ``rgb.00000.jpg``...):
    ``_groups`` then does the general work, ~2x slower per member."""
    groups: dict[str, dict] = {}
    group, key = None, None
    for j, (name, offset, size, crc) in enumerate(members):
        if key is None or not name.startswith(key) or name[len(key):len(key) + 1] != ".":
            key = name.partition(".")[0]
            if key in groups or "/" in key:
                return None
            group = groups[key] = {"json": None, "rgb0": None, "longest": 0, "first": j,
                                   "count": 0}
        group["count"] += 1
        suffix = name[len(key) + 1:]
        if suffix == "json":
            group["json"] = (offset, size, crc)
        else:
            if suffix[:4] == "rgb." and group["rgb0"] is None:
                if suffix != "rgb.00000.jpg":
                    return None
                group["rgb0"] = (offset, size)
            if size > group["longest"]:
                group["longest"] = size
    return groups


def _sample(path: str, f, key: str, group: dict, index: Path | None,
            where: _IndexLines | None) -> SampleRef | None:
    if group["json"] is None:
        log.warning("%s: sample %s has no json member; skipped", path, key)
        return None
    offset, size, crc = group["json"]
    f.seek(offset - 512 if index else offset)
    data = f.read(size + 512 if index else size)
    if index:
        header, data = data[:512], data[512:]
        if header[257:262] != b"ustar" or not _checksum_ok(header) or _octal(header[124:136]) != size:
            raise ShardIndexError(
                f"{index}: no tar header for {key}.json before byte {offset} (the index is not this tar's)"
            )
    if crc >= 0 and zlib.crc32(data) != crc:
        log.warning("%s: sample %s has a corrupt json member (CRC-32 differs); skipped", path, key)
        return None
    try:
        meta = json.loads(data)
        label, num_frames = int(meta["label"]), int(meta["num_frames"])
    except (ValueError, KeyError, TypeError) as err:
        log.warning("%s: sample %s has unreadable json (%s); skipped", path, key, err)
        return None
    # The frame size comes from the first frame's JPEG header: it is what the crops are cut
    # from, whatever the json says about the source video.
    jpeg_size = None
    if group["rgb0"] is not None:
        f.seek(group["rgb0"][0])
        jpeg_size = _jpeg_size(f.read(min(group["rgb0"][1], 65536)))
    if jpeg_size is None:
        log.warning("%s: sample %s has no readable first frame; skipped", path, key)
        return None
    video_id = str(meta.get("video_id", key))
    return SampleRef(
        path=path, key=key, video_id=key if video_id == key else video_id, label=label,
        num_frames=num_frames, height=jpeg_size[0], width=jpeg_size[1],
        members=None if where else _frame_table(group["frames"]), lines=where,
    )


def scan_tar_members(path: Path) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of the regular files of a tar, up to the first damage, and
    what the damage is (None if the archive is whole).

    The fallback for shards without an index file. Headers are parsed here, one ``pread`` each
    (plus one for a pax or GNU long-name record): ``tarfile`` takes ~4x longer per member on
    fields we do not need, which is minutes at UCF101's millions of members. webdataset's
    TarWriter writes a pax record before every member. Every step moves at least one block
    forward and every malformed field ends the scan with its damage, so it cannot loop.
    """
    members = []
    file_size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        pending: dict[bytes, bytes] = {}  # pax / GNU overrides for the next member
        while True:
            header = os.pread(fd, 512, position)
            if len(header) < 512:
                return members, "archive ends inside a header"
            if header == _ZERO_BLOCK:
                return members, None
            if header[257:262] != b"ustar" or not _checksum_ok(header):
                return members, f"invalid header at byte {position}"
            kind = header[156:157]
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
            size = _octal(header[124:136])
            if size is None:
                return members, f"invalid size field in the header at byte {position}"
            data = position + 512
            if data + size > file_size:
                return members, f"member {name.decode(errors='replace')} runs past the end"
            position = data + (size + 511) // 512 * 512
            if kind in (b"x", b"L"):
                record = os.pread(fd, size, data)
                if kind == b"L":
                    pending[b"path"] = record.split(b"\0", 1)[0]
                    continue
                records = _pax_records(record)
                if records is None:
                    return members, f"invalid pax record at byte {data}"
                pending.update(records)
                continue
            name = pending.get(b"path", name)
            if b"size" in pending:
                size = _decimal(pending[b"size"])
                if size is None or data + size > file_size:
                    return members, f"invalid pax size for the member at byte {data}"
            pending = {}
            if kind in (b"0", b"\0"):
                members.append((name.decode(errors="replace"), data, size))
    finally:
        os.close(fd)


def _is_number(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also accepts e.g. ``"²"``, which ``int`` rejects)."""
    return text.isascii() and text.isdigit()


def _octal(field: bytes) -> int | None:
    """A tar header number (octal ASCII), None if it is not one."""
    digits = field.strip(b" \0")
    if digits.translate(None, b"01234567"):  # anything but 0-7 (a sign, base-256 sizes, garbage)
        return None
    return int(digits or b"0", 8)


def _decimal(value: bytes) -> int | None:
    return int(value) if value.isdigit() else None


def _pax_records(data: bytes) -> dict[bytes, bytes] | None:
    """``"%d %s=%s\\n"`` records of a pax extended header; None if they are malformed (a
    length that is not a number, too short to move forward, or past the end)."""
    records, i = {}, 0
    data = data.rstrip(b"\0")
    while i < len(data):
        space = data.find(b" ", i)
        length = _decimal(data[i:space]) if space > i else None
        if length is None or length <= space - i + 1 or i + length > len(data):
            return None
        key, _, value = data[space + 1 : i + length - 1].partition(b"=")
        records[key] = value
        i += length
    return records


_ZERO_BLOCK = bytes(512)


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].strip(b" \0") or b"0", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])
