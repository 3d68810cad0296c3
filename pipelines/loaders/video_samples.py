"""Samples made in memory from video files, read like shards (for ``stresnet predict``).

``pipelines.sample_encoding.video_sample`` turns a video into exactly the sample the shard writer
would store (frames and quantized flow as JPEGs, the same metadata). :class:`VideoSamples` offers
those samples through the two methods ``ClipSource`` uses of a ``ShardIndex`` (``ref`` and
``read``), so a video file goes through the same clip plan, crops, resizing and normalisation as
a test video in the shards, and scores the same.
"""

from __future__ import annotations

import json

import numpy as np

from pipelines.loaders.shard_reader import FRAME_KINDS, SampleError, SampleRef


class VideoSamples:
    """A ``ShardIndex`` stand-in over in-memory samples (``video_sample`` results)."""

    folder = "<memory>"

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples
        self.refs = []
        for sample in samples:
            meta = json.loads(sample["json"])
            self.refs.append(SampleRef(
                path=str(meta["source"]), key=sample["__key__"], video_id=meta["video_id"],
                label=int(meta["label"]), num_frames=int(meta["num_frames"]),
                height=int(meta["height"]), width=int(meta["width"]),
                members=np.empty((len(FRAME_KINDS), 0, 2), dtype=np.int64),
            ))

    def __len__(self) -> int:
        return len(self.samples)

    def ref(self, index: int) -> SampleRef:
        return self.refs[index]

    def read(self, index: int, names: list[str]) -> dict[str, bytes]:
        sample = self.samples[index]
        missing = [n for n in names if n not in sample]
        if missing:
            raise SampleError(f"{self.refs[index].path}: no member {missing[0]}")
        return {name: sample[name] for name in names}
