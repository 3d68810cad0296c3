"""Dataset sources: exact counts from the real split files, and every offender listed on errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.sources import DatasetError, bundled_splits, csv_source, load_source
from pipelines.config import DatasetConfig


def fake_ucf101(root: Path, splits) -> None:
    """Empty files at every path the UCF101 split lists name (split 1 train+test = all 13,320)."""
    for line in (splits / "classInd.txt").read_text().splitlines():
        (root / line.split()[1]).mkdir(parents=True, exist_ok=True)
    for line in (splits / "trainlist01.txt").read_text().splitlines() + (
        splits / "testlist01.txt"
    ).read_text().splitlines():
        if line.strip():
            (root / line.split()[0]).touch()


def fake_hmdb51(root: Path, splits) -> None:
    for file in (f for f in splits.iterdir() if f.name.endswith("_test_split1.txt")):
        folder = root / file.name[: -len("_test_split1.txt")]
        folder.mkdir(parents=True, exist_ok=True)
        for line in file.read_text().splitlines():
            if line.strip():
                (folder / line.split()[0]).touch()


@pytest.fixture(scope="module")
def ucf_tree(tmp_path_factory) -> Path:
    """Empty video files where the bundled official UCF101 split files expect them."""
    root = tmp_path_factory.mktemp("ucf101")
    fake_ucf101(root, bundled_splits("ucf101"))
    return root


@pytest.fixture(scope="module")
def hmdb_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hmdb51")
    fake_hmdb51(root, bundled_splits("hmdb51"))
    return root


@pytest.mark.parametrize("split,train,test", [(1, 9537, 3783), (2, 9586, 3734), (3, 9624, 3696)])
def test_ucf101_split_counts(ucf_tree, split, train, test):
    index = load_source(DatasetConfig(kind="ucf101", root=str(ucf_tree), split=split))
    assert index.counts() == {"train": train, "test": test}
    assert len(index.classes) == 101
    assert index.classes[0] == "ApplyEyeMakeup" and index.classes[100] == "YoYo"
    ids = [e.video_id for e in index.entries]
    assert len(set(ids)) == len(ids) == train + test
    assert not any("." in i for i in ids)
    # The label written in trainlist (1-based) agrees with the class folder.
    last = [e for e in index.entries if e.split == "train"][-1]
    assert (last.label, last.class_name) == (100, "YoYo")
    assert last.source.startswith("YoYo/v_YoYo_g")


def test_hmdb51_split1_counts(hmdb_tree):
    index = load_source(DatasetConfig(kind="hmdb51", root=str(hmdb_tree), split=1))
    assert index.counts() == {"train": 3570, "test": 1530}
    assert index.unused == 1666
    assert len(index.classes) == 51 and index.classes == sorted(index.classes)
    ids = [e.video_id for e in index.entries]
    assert len(set(ids)) == len(ids) and not any("." in i for i in ids)


def test_ucf101_missing_files_and_unknown_folders_are_all_listed(tmp_path):
    splits = bundled_splits("ucf101")
    fake_ucf101(tmp_path, splits)
    gone = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "YoYo/v_YoYo_g01_c01.avi"]
    for rel in gone:
        (tmp_path / rel).unlink()
    (tmp_path / "NotAClass").mkdir()
    (tmp_path / "AlsoNotAClass").mkdir()
    with pytest.raises(DatasetError) as err:
        load_source(DatasetConfig(kind="ucf101", root=str(tmp_path)))
    message = str(err.value)
    assert "4 problem(s)" in message
    for rel in gone:
        assert f"missing file: {tmp_path / rel}" in message
    assert "unknown class folder" in message
    assert "NotAClass" in message and "AlsoNotAClass" in message


def test_hmdb51_unused_entries_need_no_file(tmp_path):
    splits = bundled_splits("hmdb51")
    fake_hmdb51(tmp_path, splits)
    unused = next(
        line.split()[0]
        for line in (splits / "brush_hair_test_split1.txt").read_text().splitlines()
        if line.split()[1] == "0"
    )
    (tmp_path / "brush_hair" / unused).unlink()  # not in split 1: fine
    index = load_source(DatasetConfig(kind="hmdb51", root=str(tmp_path)))
    assert index.unused == 1666


def test_a_user_splits_dir_wins_over_the_bundled_files(tmp_path):
    """A folder of one's own (here: the bundled UCF101 files cut to two classes) is what is read."""
    splits, root = tmp_path / "splits", tmp_path / "videos"
    splits.mkdir()
    bundled = bundled_splits("ucf101")
    keep = ("ApplyEyeMakeup", "ApplyLipstick")
    (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 ApplyLipstick\n")
    for name in ("trainlist01.txt", "testlist01.txt"):
        lines = [l for l in (bundled / name).read_text().splitlines() if l.startswith(keep)]
        (splits / name).write_text("\n".join(lines) + "\n")
    fake_ucf101(root, splits)
    index = load_source(DatasetConfig(kind="ucf101", root=str(root), splits_dir=str(splits)))
    assert index.classes == list(keep)
    assert index.counts() == {"train": 183, "test": 76}  # counted in the official lists


def test_csv_source(tmp_path):
    for name in ("a.mp4", "b.v2.mp4", "sub/a.mp4"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    listing = tmp_path / "list.csv"
    listing.write_text("path,label,split\na.mp4,10,train\nb.v2.mp4,2,test\nsub/a.mp4,2\n")
    index = load_source(DatasetConfig(kind="csv", csv=str(listing)))
    assert index.classes == ["2", "10"]  # numeric labels sort numerically
    assert [(e.video_id, e.label, e.split) for e in index.entries] == [
        ("a", 1, "train"), ("b_v2", 0, "test"), ("a_2", 0, "train")]


def test_csv_source_with_a_byte_order_mark_reads_its_header_as_a_header(tmp_path):
    """issue 13 item 12: Excel's "CSV UTF-8" starts with a BOM; "\ufeffpath" was read as data."""
    (tmp_path / "a.mp4").touch()
    listing = tmp_path / "list.csv"
    listing.write_bytes("path,label,split\na.mp4,walk,train\n".encode("utf-8-sig"))
    index = csv_source(listing)
    assert index.classes == ["walk"]
    assert [(e.video_id, e.split) for e in index.entries] == [("a", "train")]


def test_csv_source_lists_every_bad_row_and_missing_file(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("x.mp4,walk\ny.mp4,run,test\nonly-a-path\nz.mp4,run,train,extra\n")
    with pytest.raises(DatasetError) as err:
        load_source(DatasetConfig(kind="csv", csv=str(listing)))
    message = str(err.value)
    assert "4 problem(s)" in message
    assert "row 3" in message and "row 4" in message
    assert f"missing file: {tmp_path / 'x.mp4'}" in message
    assert f"missing file: {tmp_path / 'y.mp4'}" in message


def test_csv_source_unreadable_file_names_it(tmp_path):
    with pytest.raises(DatasetError, match="nope.csv: cannot read"):
        csv_source(tmp_path / "nope.csv")
