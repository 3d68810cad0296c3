"""``stresnet predict``: video files through the evaluation path of the model's own run.

A randomly initialised tiny model (its checkpoint records the shards' classes and settings, as
training saves it) scores the tiny synthetic dataset's test videos once through the shards
(``stresnet.evaluate``, what ``stresnet evaluate`` runs) and once from the video files
(``stresnet predict``): the scores must agree. Other containers, codecs, sizes and lengths must
work; unreadable files are reported and skipped with exit status 1.
"""

from __future__ import annotations

import csv
import re
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cluster.predict import main as predict
from pipelines.shard_format import model_shard_info, read_manifest
from pipelines.video import write_video
from stresnet.checkpoint import save_checkpoint
from cluster.config import load_config
from stresnet.config import to_dict
from stresnet.model import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "tiny.yaml"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny shards and a tiny model's checkpoint folder: (root, config, checkpoint folder)."""
    from pipelines.shards import make_shards

    root = tmp_path_factory.mktemp("predict")
    cfg = load_config(TINY, [f"dataset.root={root}/videos", f"shards.output={root}/shards",
                             f"data.shards={root}/shards", "model.init.kind=random",
                             "sampling.test_crops=center_flip"])
    manifest = make_shards(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    checkpoint = save_checkpoint(root / "run" / "checkpoint_0000001", model, to_dict(cfg),
                                 shards=model_shard_info(manifest))
    return root, cfg, checkpoint


def run_predict(capsys, *argv: str) -> tuple[int, str, str]:
    code = predict(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_on_generator_videos_scores_like_evaluate(workspace, capsys, tmp_path):
    from pipelines.loaders import build_loader
    from pipelines.sources import load_source
    from stresnet.evaluate import collect_scores
    from stresnet.model import load_model

    root, cfg, checkpoint = workspace
    model = load_model(checkpoint)
    loader = build_loader(cfg, cfg.data.val_split, 0, 1, backend="cpu", train=False)
    evaluated = collect_scores(model, loader, torch.device("cpu")).videos
    entries = {e.video_id: e for e in load_source(cfg.dataset).entries if e.video_id in evaluated}
    assert len(entries) == 7
    ids = sorted(entries)
    output = tmp_path / "predictions.json"
    code, out, err = run_predict(capsys, "--model", str(root / "run"), "--top-k", "7",
                                 "--output", str(output), *[str(entries[v].path) for v in ids])
    assert code == 0, err
    predictions = json.loads(output.read_text())
    assert predictions["failures"] == []
    classes = read_manifest(cfg.data.shards)["classes"]
    for video_id, result in zip(ids, predictions["predictions"]):
        assert result["video"] == str(entries[video_id].path)
        assert result["views"] == 2  # center_flip
        assert set(result["top_k"]) == {"appearance", "motion", "fused"}
        for stream, ranked in result["top_k"].items():
            expected = evaluated[video_id]["scores"][stream] / evaluated[video_id]["views"]
            assert ranked[0]["class"] == classes[int(np.argmax(expected))], (video_id, stream)
            got = np.zeros(len(classes))
            for item in ranked:
                got[item["index"]] = item["score"]
                assert item["class"] == classes[item["index"]]
            np.testing.assert_allclose(got, expected, atol=2e-6)
    assert f"fused       {predictions['predictions'][0]['top_k']['fused'][0]['class']}" in out


def moving_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A textured square moving right: BGR uint8 (count, H, W, 3)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, (height // 2, width // 3, 3), dtype=np.uint8)
    frames = np.full((count, height, width, 3), 60, np.uint8)
    for i in range(count):
        x = min(i * 2, width - texture.shape[1])
        frames[i, height // 4 : height // 4 + texture.shape[0], x : x + texture.shape[1]] = texture
    return frames


def write_mjpeg(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuvj420p"
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
            for packet in stream.encode(frame.reformat(format="yuvj420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_predict_reads_common_containers_sizes_and_lengths_and_skips_bad_files(workspace, capsys, tmp_path):
    root, cfg, checkpoint = workspace
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    write_video(videos / "h264_qcif.mp4", moving_frames(12, 144, 176), 25)  # H.264 MP4, 176x144
    write_video(videos / "mpeg4_720p.avi", moving_frames(3, 720, 1280), 30)  # MPEG-4 AVI, 1280x720
    write_mjpeg(videos / "sub" / "mjpeg.avi", moving_frames(8, 120, 160))  # MJPEG AVI
    write_video(videos / "two_frames.mp4", moving_frames(2, 64, 80), 25)  # shorter than one flow stack
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    write_video(videos / "one_frame.mp4", moving_frames(1, 64, 80), 25)  # no flow at all
    output = tmp_path / "out" / "predictions.csv"
    code, out, err = run_predict(capsys, "--model", str(checkpoint / "model.pt"), "--top-k", "3",
                                 "--output", str(output), "--device", "cpu", str(videos))
    assert code == 1  # some failed
    assert "2 of 6 video(s) failed" in err
    assert f"skipped {videos / 'corrupt.mp4'}" in err and f"skipped {videos / 'one_frame.mp4'}" in err
    with output.open() as f:
        rows = list(csv.DictReader(f))
    ok = {r["video"] for r in rows if not r["error"]}
    assert ok == {str(videos / n) for n in ("h264_qcif.mp4", "mpeg4_720p.avi", "sub/mjpeg.avi", "two_frames.mp4")}
    failed = {r["video"]: r["error"] for r in rows if r["error"]}
    assert set(failed) == {str(videos / "corrupt.mp4"), str(videos / "one_frame.mp4")}
    assert "only 1 frame" in failed[str(videos / "one_frame.mp4")]
    classes = set(read_manifest(cfg.data.shards)["classes"])
    for video in ok:  # 3 ranks per stream, class names from the manifest
        mine = [r for r in rows if r["video"] == video]
        assert sorted((r["stream"], r["rank"]) for r in mine) == sorted(
            (s, str(k)) for s in ("appearance", "motion", "fused") for k in (1, 2, 3))
        assert {r["class"] for r in mine} <= classes
    assert "1280x720" in out and "176x144" in out


def test_predict_refuses_a_model_whose_shards_were_remade_with_other_flow(workspace, capsys, tmp_path):
    root, cfg, checkpoint = workspace
    payload = torch.load(checkpoint / "model.pt", weights_only=True)
    payload["shards"]["params"] = {**payload["shards"]["params"], "flow": "tvl1"}
    torch.save(payload, tmp_path / "model.pt")
    code, _, err = run_predict(capsys, "--model", str(tmp_path / "model.pt"), str(tmp_path))
    assert code == 2
    assert re.search(r"trained on shards made with flow='tvl1', but .*manifest.json now says "
                     r"flow='farneback'", err), err
    # Without any record of the shards (old file, shard folder gone): refused, not guessed.
    del payload["shards"]
    payload["config"]["data"]["shards"] = str(tmp_path / "gone")
    torch.save(payload, tmp_path / "model.pt")
    code, _, err = run_predict(capsys, "--model", str(tmp_path / "model.pt"), str(tmp_path))
    assert code == 2 and "does not record its training shards' settings" in err
