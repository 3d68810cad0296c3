"""The data side of the run config: ``dataset`` (with ``synthetic``), ``shards`` and ``data``.

The sections that ``pipelines`` reads and ``stresnet`` does not: which videos make the dataset
(``pipelines.sources``, ``pipelines.synthetic``), how ``stresnet shards`` writes them
(``pipelines.shards`` and the modules it calls), and what the loaders read
(``pipelines.loaders``). The mechanism (``num``, ``path``, ``ConfigError``, validation) and the
model/training sections are in ``stresnet.config``; the whole ``RunConfig``, YAML loading and the
launcher sections are in ``cluster.config``, which ``pipelines`` may not import: functions that
read several sections of a run take a :class:`PipelineConfig`, which ``RunConfig`` is.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol

from stresnet.config import (
    ConfigError, EvalConfig, ModelConfig, SamplingConfig, TrainConfig, _list, num, path,
)


@dataclass
class SyntheticConfig:
    """The bundled synthetic action dataset (see ``pipelines/synthetic.py``)."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"frames": "video_frames"}

    videos_per_class: int = num(8, min=2)
    video_frames: int = num(40, min=4)  # length of every video
    height: int = num(64, min=16)
    width: int = num(80, min=16)
    fps: float = num(25.0, min=1.0)
    test_fraction: float = num(0.25, min=0.0, max=0.9)
    families: list[Literal["appearance", "motion", "conjunction", "order"]] = _list(
        "appearance", "motion", "conjunction", "order"
    )
    seed: int = 0

    def check(self) -> None:
        for key in ("height", "width"):  # H.264/MPEG-4 in yuv420p need even sizes
            if getattr(self, key) % 2:
                raise ConfigError(f"{key}: got {getattr(self, key)}, expected an even number")
        if not self.families or len(set(self.families)) != len(self.families):
            raise ConfigError(f"families: got {self.families}, expected one or more distinct families")

@dataclass
class DatasetConfig:
    """Where the videos are and which split files describe them."""

    kind: Literal["ucf101", "hmdb51", "csv", "synthetic"] = "synthetic"
    root: str = path("data/synthetic/videos")  # folder of videos (for synthetic: where they are written)
    # ucf101/hmdb51: a folder of split files; None: the official files bundled with stresnet
    splits_dir: Optional[str] = path(None)
    csv: Optional[str] = path(None)  # csv source: path,label[,split]
    split: int = num(1, min=1, max=3)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def check(self) -> None:
        if self.kind == "csv" and not self.csv:
            raise ConfigError("csv: required when dataset.kind is 'csv'")

@dataclass
class ShardsConfig:
    """Videos -> RGB frames + optical flow -> WebDataset shards (``stresnet shards``)."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"workers": "processes (null: one per core)"}

    output: str = path("data/synthetic/shards")
    samples_per_shard: int = num(64, min=1)
    # Stored frames: resize so the shorter side is this; 0 keeps the native size. Flow is always
    # computed on the native frames, so its values are in the video's own pixels.
    short_side: int = num(0, min=0)
    fps: Optional[float] = num(None, min=1.0)  # None keeps the native frame rate
    flow: Literal["tvl1", "farneback"] = "tvl1"
    tvl1_epsilon: float = num(0.01, min=1e-4, max=1.0)  # TV-L1 stopping threshold (OpenCV default)
    flow_bound: float = num(20.0, min=1.0)  # pixels; flow is clipped to [-bound, bound]
    jpeg_quality: int = num(90, min=50, max=100)
    processes: Optional[int] = num(None, min=1)  # None: one per core
    num_partitions: int = num(1, min=1)  # for job arrays: this task writes partition `partition`
    partition: Optional[int] = num(None, min=0)  # None = all partitions in this process
    allow_failures: bool = False  # exit 0 even when some videos could not be read
    # Failure injection for tests: the process kills itself after writing this many samples.
    crash_after_samples: Optional[int] = num(None, min=1)

    def check(self) -> None:
        if 0 < self.short_side < 16:
            raise ConfigError(f"short_side: got {self.short_side}, expected 0 (native) or >= 16")
        if self.partition is not None and self.partition >= self.num_partitions:
            raise ConfigError(
                f"partition: got {self.partition}, expected 0..{self.num_partitions - 1}"
            )

@dataclass
class DataConfig:
    """What training and evaluation read."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"batch_size": "batch_size_per_worker"}

    shards: str = path("data/synthetic/shards")  # folder holding manifest.json and the shards
    backend: Literal["cpu", "dali"] = "cpu"
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: decode on the GPU if there is one
    batch_size_per_worker: int = num(8, min=1)  # clips per worker per micro-batch
    loader_workers: int = num(2, min=0)  # loader processes per worker; 0: in the worker itself
    decode_threads: int = num(0, min=0)  # DALI CPU threads; 0: the process's cores, at most 8
    hw_decoder_load: float = num(0.65, min=0.0, max=1.0)  # share of JPEGs for nvJPEG's HW engine
    # Damaged samples (truncated or missing shard, corrupt member) are skipped and counted; more
    # than this fraction of a split stops training and evaluation (docs/reliability.md).
    max_damaged_fraction: float = num(0.01, min=0.0, max=1.0)
    train_split: str = "train"
    val_split: str = "test"
    # How training reads its shards (docs/loaders.md, "Streaming"): random = seek to each clip's
    # members through the index files; stream = read whole shards in sequence, from
    # data.stream_url, as WebDataset does (local files, http(s)://, pipe: commands, e.g. an
    # object store's CLI). Evaluation reads data.shards by random access either way.
    access: Literal["random", "stream"] = "random"
    # stream: where the shard NAME listed in data.shards/manifest.json is read from, "{name}"
    # replaced by it, e.g. "http://host/ucf101/{name}" or "pipe:aws s3 cp s3://bucket/ucf101/{name} -".
    # Empty: the file data.shards/NAME.
    stream_url: str = ""
    stream_shuffle_buffer: int = num(64, min=1)  # clips held for shuffling, per loader process
    stream_retries: int = num(3, min=0)  # re-opens of a shard whose stream breaks off

    def check(self) -> None:
        if self.stream_url and self.stream_url.count("{name}") != 1:
            raise ConfigError(
                f"stream_url: got {self.stream_url!r}, expected exactly one '{{name}}' (where the "
                "shard's file name goes)"
            )



class PipelineConfig(Protocol):
    """The sections of a run config that ``pipelines`` reads (``cluster.config.RunConfig`` is one)."""

    seed: int
    dataset: DatasetConfig
    shards: ShardsConfig
    model: ModelConfig
    sampling: SamplingConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
