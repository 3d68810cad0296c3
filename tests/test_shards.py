"""The shard writer: round trip, failures, resume after a kill, partitions + finalize."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
import yaml

from cluster.config import load_config
from cluster.shards import main
from pipelines import shard_format as fmt
from pipelines.shards import ShardFailures, ShardsError, finalize, make_shards
from pipelines.synthetic import write_synthetic_dataset
from pipelines.video import write_video

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """A small synthetic dataset (7 classes x 2 videos of 6 frames, 32x40), written once."""
    root = tmp_path_factory.mktemp("synthetic")
    cfg = load_config(None, small_overrides(root, root.parent / "unused"))
    write_synthetic_dataset(cfg.dataset)
    return root


def small_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "dataset.kind=synthetic", f"dataset.root={root}",
        "dataset.synthetic.videos_per_class=2", "dataset.synthetic.video_frames=6",
        "dataset.synthetic.height=32", "dataset.synthetic.width=40",
        "dataset.synthetic.test_fraction=0.5", "dataset.synthetic.families=[appearance, motion]",
        f"shards.output={out}", "shards.samples_per_shard=3", "shards.short_side=0",
        "shards.flow=farneback", "shards.processes=1", *extra,
    ]


def config_file(tmp_path: Path, overrides: list[str]) -> Path:
    """The overrides as a YAML config file (for the CLI in a subprocess)."""
    cfg = load_config(None, overrides)
    path = tmp_path / f"config-{hashlib.sha1(str(overrides).encode()).hexdigest()[:8]}.yaml"
    from cluster.config import dump_config

    dump_config(cfg, path)
    return path


def read_samples(folder: Path) -> dict[str, dict]:
    """Every sample of every shard in the manifest: key -> {member: sha1}, checking no duplicates."""
    manifest = fmt.read_manifest(folder)
    samples: dict[str, dict] = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            count = 0
            for sample in wds.WebDataset(str(folder / shard["name"]), shardshuffle=False):
                key = sample["__key__"]
                assert key not in samples, f"{key} appears twice"
                samples[key] = {
                    k: hashlib.sha1(v).hexdigest() for k, v in sample.items() if not k.startswith("__")
                }
                count += 1
            assert count == shard["samples"]
    return samples


def test_round_trip_video_to_shard_to_frames(videos, tmp_path):
    out = tmp_path / "shards"
    cfg = load_config(None, small_overrides(videos, out, "shards.short_side=16"))
    manifest = make_shards(cfg)
    assert manifest["format"] == fmt.FORMAT_VERSION
    assert manifest["classes"][:3] == ["RedDisc", "GreenDisc", "BlueDisc"]
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 7, "test": 7}
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [3, 3, 1]
    assert manifest["failures"] == [] and manifest["unused"] == 0
    assert set(manifest["versions"]) >= {"torch", "cv2", "av", "webdataset", "numpy", "python"}
    assert manifest["params"]["short_side"] == 16
    # The synthetic classes' families travel with the data (real datasets get {}).
    assert manifest["class_families"] == {
        **{c: "appearance" for c in ("RedDisc", "GreenDisc", "BlueDisc")},
        **{f"SquareMoves{d}": "motion" for d in ("Left", "Right", "Up", "Down")},
    }

    samples = list(wds.WebDataset(str(out / "train-p000-00000.tar"), shardshuffle=False))
    meta = json.loads(samples[0]["json"])
    assert meta["num_frames"] == 6 and (meta["height"], meta["width"]) == (16, 20)
    assert meta["split"] == "train" and meta["flow_method"] == "farneback"
    assert manifest["classes"][meta["label"]] == meta["class_name"]
    assert meta["source"] == f"{meta['class_name']}/{meta['video_id']}" + Path(meta["source"]).suffix
    rgb = [k for k in samples[0] if k.startswith("rgb.")]
    flow_x = [k for k in samples[0] if k.startswith("flow_x.")]
    flow_y = [k for k in samples[0] if k.startswith("flow_y.")]
    assert sorted(rgb) == [fmt.rgb_member(i) for i in range(6)]
    assert sorted(flow_x) == [fmt.flow_members(i)[0] for i in range(5)]
    assert len(flow_y) == 5
    image = cv2.imdecode(np.frombuffer(samples[0]["rgb.00005.jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (16, 20, 3)
    flow = cv2.imdecode(np.frombuffer(samples[0]["flow_y.00004.jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert flow.shape == (16, 20)  # grayscale

    # Plain tars that `tar` lists, each with an index file that locates every member's bytes.
    tars = sorted(out.glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.idx")) == [fmt.index_name(p.name) for p in tars]
    for path in tars:
        listed = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True)
        index = json.loads((out / fmt.index_name(path.name)).read_text())
        assert index["format"] == fmt.INDEX_FORMAT and index["tar_size"] == path.stat().st_size
        assert [name for name, _, _, _ in index["members"]] == listed.stdout.split()
        with tarfile.open(path) as tar:
            for (name, offset, size, crc), member in zip(index["members"], tar.getmembers(), strict=True):
                assert (name, offset, size) == (member.name, member.offset_data, member.size)
                assert crc == zlib.crc32(tar.extractfile(member).read())


def test_rerun_on_complete_output_does_nothing(videos, tmp_path, capsys):
    out = tmp_path / "shards"
    cfg = load_config(None, small_overrides(videos, out))
    make_shards(cfg)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    make_shards(cfg)
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # Other settings on the same output are refused instead of mixing two kinds of shards.
    with pytest.raises(ShardsError, match="other settings"):
        make_shards(load_config(None, small_overrides(videos, out, "shards.jpeg_quality=70")))


def test_an_edited_source_list_is_refused_instead_of_keeping_old_labels(videos, tmp_path, capsys):
    """issue 13 item 5: a re-run after editing the CSV said "nothing to do" and kept shards with
    the old labels. The shard folder records a digest of its source list."""
    files = sorted(videos.rglob("v_*.avi"))[:4]
    listing = tmp_path / "list.csv"

    def write_list(labels):
        rows = zip(files, labels, ["train", "train", "test", "test"])
        listing.write_text("path,label,split\n" + "".join(f"{f},{l},{s}\n" for f, l, s in rows))

    out = tmp_path / "shards"
    cfg = load_config(None, small_overrides(videos, out, "dataset.kind=csv", f"dataset.csv={listing}"))
    write_list(["walk", "run", "walk", "run"])
    manifest = make_shards(cfg)
    assert manifest["params"]["sources"].startswith("sha256:")
    capsys.readouterr()
    make_shards(cfg)
    assert "nothing to do" in capsys.readouterr().out  # unchanged: still nothing to do
    write_list(["run", "walk", "walk", "run"])
    with pytest.raises(ShardsError, match=r"the source list \(CSV, split files or video folders\) "
                                          r"changed since .* was made"):
        make_shards(cfg)


def test_invalid_json_in_the_manifest_or_a_progress_file_is_named(videos, tmp_path, capsys):
    """issue 13 item 10: both gave a JSONDecodeError traceback without the file's name."""
    from pipelines.shard_format import read_manifest

    out = tmp_path / "shards"
    cfg = load_config(None, small_overrides(videos, out))
    make_shards(cfg)
    (out / "manifest.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=rf"{out}/manifest.json: not valid JSON"):
        read_manifest(out)
    make_shards(cfg)  # the shards are all there: the manifest is written again
    assert "rewriting" in capsys.readouterr().out and read_manifest(out)["splits"]
    (out / "manifest.json").unlink()
    (out / "progress-p000.json").write_text("{not json")
    with pytest.raises(ShardsError, match=rf"{out}/progress-p000.json: not valid JSON .*delete it"):
        make_shards(cfg)


def test_corrupt_truncated_and_empty_videos_are_skipped_and_reported(videos, tmp_path, capsys):
    good = sorted(videos.rglob("v_*"))[:3]
    avi = next(p for p in sorted(videos.rglob("v_*.avi")))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.avi").write_bytes(b"\x00not a video" * 100)
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "truncated.avi").write_bytes(avi.read_bytes()[: avi.stat().st_size // 2])
    write_video(bad / "oneframe.mp4", np.zeros((1, 32, 40, 3), np.uint8), 25.0)
    data = avi.read_bytes()  # headers intact, cut where the frame data ('movi' list) starts
    (bad / "zeroframes.avi").write_bytes(data[: data.index(b"movi") + 4])
    listing = tmp_path / "list.csv"
    rows = [f"{p},{p.parent.name},train" for p in good]
    broken = ("garbage.avi", "empty.mp4", "truncated.avi", "oneframe.mp4", "zeroframes.avi")
    rows += [f"bad/{name},RedDisc,train" for name in broken]
    listing.write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    overrides = ["dataset.kind=csv", f"dataset.csv={listing}", f"shards.output={out}",
                 "shards.short_side=0", "shards.flow=farneback", "shards.processes=1"]

    with pytest.raises(ShardFailures) as err:
        make_shards(load_config(None, overrides))
    reasons = {Path(f["source"]).name: f["reason"] for f in err.value.manifest["failures"]}
    assert set(reasons) == set(broken)
    assert "decode error" in reasons["garbage.avi"]
    assert "truncated" in reasons["truncated.avi"]
    assert "only 1 frame" in reasons["oneframe.mp4"]
    assert reasons["zeroframes.avi"] == "no frames decoded"
    assert "5 video(s) failed" in str(err.value)
    # The good videos were written anyway, and the CLI exits non-zero unless failures are allowed.
    assert len(read_samples(out)) == 3
    cfg_file = config_file(tmp_path, overrides)
    assert main(["--config", str(cfg_file)]) == 1
    assert main(["--config", str(cfg_file), "shards.allow_failures=true"]) == 0


def test_killed_run_resumes_to_the_same_samples(videos, tmp_path):
    reference = tmp_path / "reference"
    make_shards(load_config(None, small_overrides(videos, reference)))

    out = tmp_path / "resumed"
    cfg_file = config_file(tmp_path, small_overrides(videos, out))
    command = [sys.executable, "-m", "cluster.cli", "shards", "--config", str(cfg_file)]
    # The run kills itself (SIGKILL) in the middle of its third shard.
    crashed = subprocess.run(command + ["shards.crash_after_samples=7"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -9, crashed.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-p000-00000.tar", "test-p000-00001.tar"]
    assert len(list(out.glob("*.partial"))) == 1  # the half-written shard, never a .tar
    assert not (out / fmt.MANIFEST).exists()

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "(2 already written)" in resumed.stdout
    assert not list(out.glob("*.partial"))
    assert read_samples(out) == read_samples(reference)
    written = sorted(p.name for p in reference.glob("*.tar*"))
    assert written == sorted(p.name for p in out.glob("*.tar*")) and len(written) == 12  # 6 shards
    for name in written:  # deterministic down to the bytes, index files included
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_three_partitions_then_finalize_equal_one_process(videos, tmp_path, capsys):
    single = tmp_path / "single"
    make_shards(load_config(None, small_overrides(videos, single, "shards.processes=2")))

    out = tmp_path / "parts"
    cfg_file = config_file(tmp_path, small_overrides(videos, out, "shards.num_partitions=3"))
    for partition in (2, 0):
        assert main(["--config", str(cfg_file), f"shards.partition={partition}"]) == 0
    with pytest.raises(ShardsError, match="partition 1: 2 shard"):
        finalize(load_config(cfg_file))
    assert main(["--config", str(cfg_file), "--finalize"]) == 2
    assert main(["--config", str(cfg_file), "shards.partition=1"]) == 0
    capsys.readouterr()
    assert main(["--config", str(cfg_file), "shards.partition=1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["--config", str(cfg_file), "--finalize"]) == 0

    manifest = fmt.read_manifest(out)
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert names == ["train-p000-00000.tar", "train-p001-00000.tar", "train-p002-00000.tar"]
    assert read_samples(out) == read_samples(single)


def test_shipped_configs_load():
    for name in ("ucf101", "hmdb51", "csv", "synthetic"):
        cfg = load_config(REPO / "configs" / "shards" / f"{name}.yaml")
        assert cfg.dataset.kind == name
        assert yaml.safe_load((REPO / "configs" / "shards" / f"{name}.yaml").read_text())


def test_hmdb51_layout_end_to_end(videos, tmp_path):
    """An HMDB51-style tree (class folders, per-class split files with 0/1/2 flags) -> manifest."""
    root, splits = tmp_path / "videos", tmp_path / "splits"
    splits.mkdir()
    sources = sorted(videos.rglob("v_*.avi"))[:6]
    for number, cls in enumerate(("brush_hair", "cartwheel")):
        (root / cls).mkdir(parents=True)
        lines = []
        for i, flag in enumerate((1, 2, 0)):
            name = f"clip.{cls}_{i}.avi"  # dots in names must not reach the sample keys
            (root / cls / name).write_bytes(sources[3 * number + i].read_bytes())
            lines.append(f"{name} {flag} ")
        (splits / f"{cls}_test_split1.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    manifest = make_shards(load_config(None, [
        "dataset.kind=hmdb51", f"dataset.root={root}", f"dataset.splits_dir={splits}",
        f"shards.output={out}", "shards.short_side=0", "shards.flow=farneback", "shards.processes=1"]))
    assert manifest["classes"] == ["brush_hair", "cartwheel"]
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 2, "test": 2}
    assert manifest["unused"] == 2
    samples = read_samples(out)
    assert sorted(samples) == ["clip_brush_hair_0", "clip_brush_hair_1", "clip_cartwheel_0", "clip_cartwheel_1"]


@pytest.mark.parametrize("short_side", [0, 120])
def test_flow_of_a_320x240_video_is_computed_at_320x240(tmp_path, short_side):
    """Flow is computed on the native frames whatever the stored size: a pattern moving 4
    native pixels per frame gives flow x = 4 px, also when the frames are stored at half size
    (flow computed on resized frames would say 2)."""
    from pipelines.sample_encoding import Processing, video_sample
    from pipelines.sources import VideoEntry

    height, width, speed = 240, 320, 4
    # a smooth random texture moving right by `speed` pixels per frame
    noise = np.random.default_rng(0).uniform(0, 255, (height, width + 64)).astype(np.float32)
    texture = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 3), None, 0, 255, cv2.NORM_MINMAX)
    texture = texture.astype(np.uint8)
    frames = [np.repeat(texture[:, 32 - speed * t : 32 - speed * t + width, None], 3, axis=2)
              for t in range(4)]
    path = tmp_path / "v.avi"
    write_video(path, np.stack(frames), fps=25.0)
    entry = VideoEntry(path=str(path), video_id="v", label=0, class_name="c", split="train",
                       source="v.avi")
    sample = video_sample(entry, Processing(None, short_side, "farneback", 0.01, 20.0, 95))
    meta = json.loads(sample["json"])
    assert (meta["flow_height"], meta["flow_width"]) == (240, 320)
    stored = (240, 320) if short_side == 0 else (120, 160)
    assert (meta["height"], meta["width"]) == stored
    flow_x = cv2.imdecode(np.frombuffer(sample["flow_x.00001.jpg"], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert flow_x.shape == stored
    inner = flow_x[stored[0] // 4 : -stored[0] // 4, stored[1] // 4 : -stored[1] // 4]
    pixels = (np.median(inner) / 255.0) * 40.0 - 20.0  # bytes 0..255 <- [-20, 20] px
    assert pixels == pytest.approx(speed, abs=0.5)
