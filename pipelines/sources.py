"""Which videos make up a dataset: UCF101 / HMDB51 folders with their official split files, or a CSV.

A source gives a ``DatasetIndex``: the class names (index = label) and one ``VideoEntry`` per video
with its split. Everything is checked *before* any video is processed: a split entry whose file is
missing, or a class folder the split files do not know, is an error that lists every offender.

Layouts (``dataset.root``):

The official UCF101 and HMDB51 split files ship with the package (``pipelines/splits/*.zip``);
``dataset.splits_dir`` names a folder of your own instead.

- UCF101: ``ROOT/ClassName/v_ClassName_gXX_cYY.avi``; ``splits_dir`` holds ``classInd.txt``
  (``1 ApplyEyeMakeup``, 1-based), ``trainlistNN.txt`` (``Class/file.avi LABEL``) and
  ``testlistNN.txt`` (``Class/file.avi``). The synthetic dataset writes this layout too.
- HMDB51: ``ROOT/class_name/file.avi``; ``splits_dir`` holds ``<class>_test_split<N>.txt`` with
  lines ``file.avi F`` (F = 1 train, 2 test, 0 unused). Classes are sorted by name.
- CSV: rows ``path,label[,split]`` (an optional header row starting with ``path``); paths are
  relative to the CSV file's folder; the split defaults to ``train``. Classes are the sorted label
  names (numerically when every label is an integer).
"""

from __future__ import annotations

import csv
import dataclasses
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from pipelines.config import DatasetConfig


BUNDLED_SPLITS = Path(__file__).resolve().parent / "splits"  # <kind>.zip: the official files

# A folder of split files on disk, or the same files inside a bundled zip archive.
SplitsDir = Union[Path, zipfile.Path]


def bundled_splits(kind: str) -> zipfile.Path:
    """The official split files of ``kind`` (``ucf101`` or ``hmdb51``) shipped with the package."""
    return zipfile.Path(BUNDLED_SPLITS / f"{kind}.zip")


def splits_folder(kind: str, splits_dir: str | Path | None) -> SplitsDir:
    """The user's ``splits_dir`` when given, else the bundled official files."""
    return Path(splits_dir) if splits_dir else bundled_splits(kind)


class DatasetError(ValueError):
    """The dataset description does not match the files on disk (lists every problem)."""


@dataclass(frozen=True)
class VideoEntry:
    video_id: str  # sample key in the shards: unique, no dots
    path: Path  # the video file
    source: str  # the path as the split file / CSV names it (recorded in the shards)
    label: int
    class_name: str
    split: str  # "train", "test" or a CSV split name


@dataclass
class DatasetIndex:
    name: str  # ucf101, hmdb51, csv, synthetic
    classes: list[str]  # index = label
    entries: list[VideoEntry]
    unused: int = 0  # listed by the split files but in no split (HMDB51 "0")
    problems: list[str] = field(default_factory=list)
    # class -> family (the synthetic dataset's families; real datasets have none)
    class_families: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.split for e in self.entries).items()))


def load_source(cfg: DatasetConfig) -> DatasetIndex:
    """Read the configured source and verify it against the files; raise ``DatasetError``."""
    if cfg.kind in ("ucf101", "synthetic"):
        if cfg.kind == "synthetic" and cfg.split != 1:
            raise DatasetError(f"dataset.split: the synthetic dataset has split 1 only, got {cfg.split}")
        if cfg.kind == "synthetic":  # the synthetic writer puts them beside the videos
            splits_dir: SplitsDir = Path(cfg.splits_dir or cfg.root)
        else:
            splits_dir = splits_folder("ucf101", cfg.splits_dir)
        index = ucf101_source(cfg.root, splits_dir, cfg.split)
        index.name = cfg.kind
        if cfg.kind == "synthetic":
            from pipelines.synthetic import class_families

            index.class_families = class_families(index.classes)
    elif cfg.kind == "hmdb51":
        index = hmdb51_source(cfg.root, splits_folder("hmdb51", cfg.splits_dir), cfg.split)
    else:
        index = csv_source(cfg.csv)
    check_index(index)
    return index


def ucf101_source(root: str | Path, splits_dir: str | Path | SplitsDir, split: int) -> DatasetIndex:
    root = Path(root)
    splits_dir = splits_dir if isinstance(splits_dir, zipfile.Path) else Path(splits_dir)
    class_lines = _lines(splits_dir / "classInd.txt")
    classes = [line.split()[1] for line in class_lines]
    label_of = {name: i for i, name in enumerate(classes)}
    problems: list[str] = []
    entries: list[VideoEntry] = []
    for split_name, file in (("train", f"trainlist{split:02d}.txt"), ("test", f"testlist{split:02d}.txt")):
        for line in _lines(splits_dir / file):
            rel, *label = line.split()
            class_name = rel.split("/")[0]
            if class_name not in label_of:
                problems.append(f"{splits_dir / file}: {rel}: class {class_name!r} not in classInd.txt")
                continue
            if label and label[0] != str(label_of[class_name] + 1):
                problems.append(f"{splits_dir / file}: {rel}: label {label[0]} is not {class_name}'s "
                                f"index {label_of[class_name] + 1} in classInd.txt")
                continue
            entries.append(VideoEntry("", root / rel, rel, label_of[class_name], class_name, split_name))
    problems += _unknown_folders(root, set(classes))
    return DatasetIndex("ucf101", classes, _with_ids(entries), problems=problems)


HMDB_SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>\d)\.txt$")
HMDB_SPLITS = {"1": "train", "2": "test"}  # "0": not used in this split


def hmdb51_source(root: str | Path, splits_dir: str | Path | SplitsDir, split: int) -> DatasetIndex:
    root = Path(root)
    splits_dir = splits_dir if isinstance(splits_dir, zipfile.Path) else Path(splits_dir)
    files = {}
    listing = sorted(splits_dir.iterdir(), key=lambda f: f.name) if splits_dir.is_dir() else []
    for file in listing:
        match = HMDB_SPLIT_FILE.match(file.name)
        if match and match["split"] == str(split):
            files[match["cls"]] = file
    if not files:
        raise DatasetError(f"{splits_dir}: no HMDB51 split files *_test_split{split}.txt")
    classes = sorted(files)
    entries: list[VideoEntry] = []
    unused = 0
    problems: list[str] = []
    for label, class_name in enumerate(classes):
        for line in _lines(files[class_name]):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                problems.append(f"{files[class_name]}: {line!r}: expected 'video.avi 0|1|2'")
                continue
            if parts[1] == "0":
                unused += 1
                continue
            rel = f"{class_name}/{parts[0]}"
            entries.append(VideoEntry("", root / rel, rel, label, class_name, HMDB_SPLITS[parts[1]]))
    problems += _unknown_folders(root, set(classes))
    return DatasetIndex("hmdb51", classes, _with_ids(entries), unused, problems)


def csv_source(csv_path: str | Path) -> DatasetIndex:
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # a byte-order mark is not data
    except OSError as err:
        raise DatasetError(f"{csv_path}: cannot read the CSV list ({err.strerror})") from None
    rows = [row for row in csv.reader(text.splitlines()) if row and any(c.strip() for c in row)]
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    problems: list[str] = []
    parsed = []
    for number, row in enumerate(rows, start=1):
        row = [c.strip() for c in row]
        if len(row) not in (2, 3) or not row[0] or not row[1]:
            problems.append(f"{csv_path}: row {number} {row}: expected path,label[,split]")
            continue
        parsed.append((row[0], row[1], row[2] if len(row) == 3 and row[2] else "train"))
    labels = {label for _, label, _ in parsed}
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    classes = sorted(labels, key=int if numeric else str)
    label_of = {name: i for i, name in enumerate(classes)}
    entries = [
        VideoEntry("", csv_path.parent / path, path, label_of[label], label, split)
        for path, label, split in parsed
    ]
    return DatasetIndex("csv", classes, _with_ids(entries), problems=problems)


def check_index(index: DatasetIndex) -> None:
    """Raise one ``DatasetError`` listing every problem: bad lines, unknown folders, missing files."""
    problems = list(index.problems)
    if any(p.endswith("video folder does not exist") for p in problems):
        raise DatasetError(f"{index.name} dataset: {problems[0]}")  # not one line per video
    problems += [f"missing file: {e.path} (split {e.split})" for e in index.entries if not e.path.is_file()]
    if len(index.classes) < 2 and not problems:
        problems.append(f"found {len(index.classes)} class(es), need at least 2")
    if problems:
        raise DatasetError(
            f"{index.name} dataset: {len(problems)} problem(s), nothing was processed:\n  "
            + "\n  ".join(problems)
        )


def _lines(path: SplitsDir) -> list[str]:
    try:
        text = path.read_text()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read split file ({err.strerror})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _unknown_folders(root: Path, classes: set[str]) -> list[str]:
    if not root.is_dir():
        return [f"{root}: video folder does not exist"]
    return [
        f"unknown class folder: {p} (not in the split files)"
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and p.name not in classes
    ]


def _with_ids(entries: list[VideoEntry]) -> list[VideoEntry]:
    """Give every entry a unique id without dots: the file name minus its extension.

    WebDataset splits member names at the first dot, so dots become underscores; a clash (the same
    file name in two folders) gets ``_2``, ``_3``, ... in listing order.
    """
    used: set[str] = set()
    out = []
    for e in entries:
        base = re.sub(r"[.\s]", "_", Path(e.source).stem) or "video"
        vid, n = base, 1
        while vid in used:
            n += 1
            vid = f"{base}_{n}"
        used.add(vid)
        out.append(dataclasses.replace(e, video_id=vid))
    return out
