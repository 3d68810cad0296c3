"""Typed run configuration: the mechanism, and the sections the model and training code read.

One YAML file describes one run (``cluster.config.RunConfig``, loaded by
``cluster.config.load_config``). Every section is a plain dataclass, defined in the layer whose
code reads it, so that ``stresnet`` imports nothing from ``pipelines`` or ``cluster``:

- here: ``model`` (with ``temporal``, ``temporal_pool`` and ``init``; ``model.injection`` is
  ``stresnet.cross_stream.InjectionConfig``), ``sampling``, ``train`` and ``eval``;
- ``pipelines.config``: ``dataset`` (with ``synthetic``), ``shards`` and ``data``;
- ``cluster.config``: ``cluster``, ``tracking``, the whole ``RunConfig``, YAML loading, overrides
  and the command-line arguments.

Two sections stay here although commands read them too: ``train`` is the optimisation that
``stresnet.train_step`` runs (its checkpoint and run-folder keys are in the same section because
the keys may not move), and ``eval`` holds how ``stresnet.evaluate`` averages scores
(``score_average``) next to the evaluation batch size that both ``pipelines`` (the loaders) and
``cluster`` read: ``stresnet`` is the one layer both of them may import.

:func:`from_dict` validates everything *before* any work starts: unknown keys, wrong types and
out-of-range values are rejected with the full key path and the allowed values, e.g.::

    ConfigError: model.depth: got 34, expected one of [50, 101, 152]

Validation is driven by the type hints (``int``, ``float``, ``bool``, ``str``, ``Optional``,
``Literal``, ``list``, ``tuple`` and nested dataclasses) plus ``min``/``max`` metadata on numeric
fields, so adding a field is one line; cross-field rules live in each section's ``check``. File
and folder fields are declared with :func:`path`; :func:`absolute_paths` resolves them all. A key
that was renamed stays in its section's ``RENAMED`` (old -> new), so an old config fails with
the new name, e.g. ``train.batch_size: renamed to train.global_batch_size``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from stresnet.cross_stream import InjectionConfig  # the connection's config lives with its module


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def num(default: Any, min: float | None = None, max: float | None = None) -> Any:
    """A numeric field with an allowed range (inclusive)."""
    return field(default=default, metadata={"min": min, "max": max})


def path(default: Optional[str], keep: tuple[str, ...] = ()) -> Any:
    """A file or folder field: :func:`absolute_paths` makes it absolute before a run starts.

    Values with a URI scheme (``models:/...``, ``s3://...``, ``http://...``) stay as they are,
    except ``sqlite:///relative.db``, whose file part is made absolute; so do the words in
    ``keep`` (e.g. ``imagenet``).
    """
    return field(default=default, metadata={"path": True, "keep": keep})


def _list(*default: Any) -> Any:
    return field(default_factory=lambda: list(default))


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class TemporalConfig:
    """Temporal residual convolutions (spec section 3)."""

    stages: list[Literal[2, 3, 4, 5]] = _list(2, 3, 4, 5)  # [] disables
    units: list[int] = _list(2)  # 1-based residual unit within each stage
    convs: list[Literal["a", "c"]] = _list("a", "c")  # branch2a / branch2c 1x1 convs
    kernel: int = num(3, min=1)
    init: Literal["average", "center"] = "average"
    padding: Literal["replicate", "zero"] = "replicate"

    def check(self) -> None:
        if self.kernel % 2 == 0:
            raise ConfigError(f"kernel: got {self.kernel}, expected an odd number")
        for unit in self.units:
            if unit < 1:
                raise ConfigError(f"units: got {unit}, expected 1-based unit indices >= 1")


@dataclass
class TemporalPoolConfig:
    """Temporal pooling before the classifier (spec section 4)."""

    kind: Literal["none", "max", "avg"] = "none"  # none: classify every frame, average scores
    window: int = num(5, min=1)
    stride: int = num(2, min=1)


@dataclass
class InitConfig:
    """Where the weights come from before training."""

    kind: Literal["random", "torchvision", "base_streams", "checkpoint"] = "random"
    # torchvision: a ResNet state-dict file (e.g. ImageNet weights you downloaded), loaded into
    # both streams with the cross-modality conv1 for flow. "imagenet" uses torchvision's
    # weights enum, which downloads: only where the machine may.
    torchvision_weights: Optional[str] = path(None, keep=("imagenet",))
    appearance_checkpoint: Optional[str] = path(None)  # base_streams: trained appearance base stream
    motion_checkpoint: Optional[str] = path(None)  # base_streams: trained motion base stream
    checkpoint: Optional[str] = path(None)  # checkpoint: e.g. stage 2 from stage 1

    # Which keys name the files each kind loads: the one definition.
    FILES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "random": (),
        "torchvision": ("torchvision_weights",),
        "base_streams": ("appearance_checkpoint", "motion_checkpoint"),
        "checkpoint": ("checkpoint",),
    }

    def files(self) -> dict[str, Optional[str]]:
        """``{key: value}`` of the keys this ``kind`` loads from (see ``FILES``)."""
        return {key: getattr(self, key) for key in self.FILES[self.kind]}

    def check(self) -> None:
        for key, value in self.files().items():
            if not value:
                raise ConfigError(f"{key}: required when init.kind is {self.kind!r}")


@dataclass
class ModelConfig:
    """The network (spec sections 1-4)."""

    mode: Literal["st_resnet", "late_fusion", "appearance", "motion"] = "st_resnet"
    depth: Literal[50, 101, 152] = 50
    width: float = num(1.0, min=0.03125, max=4.0)  # channel multiplier; <1 for CPU-sized nets
    num_classes: int = num(101, min=2)
    flow_length: int = num(10, min=1)  # L flow fields per stack -> 2L input channels
    dropout_appearance: float = num(0.0, min=0.0, max=0.99)
    dropout_motion: float = num(0.8, min=0.0, max=0.99)
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    temporal_pool: TemporalPoolConfig = field(default_factory=TemporalPoolConfig)
    init: InitConfig = field(default_factory=InitConfig)

    # mode -> the streams it runs; each stream reads one input (appearance: RGB, motion: flow).
    STREAMS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "st_resnet": ("appearance", "motion"),
        "late_fusion": ("appearance", "motion"),
        "appearance": ("appearance",),
        "motion": ("motion",),
    }

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams this mode runs, in output order (appearance before motion)."""
        return self.STREAMS[self.mode]

    @property
    def uses_rgb(self) -> bool:
        return "appearance" in self.streams

    @property
    def uses_flow(self) -> bool:
        return "motion" in self.streams

    @property
    def input_channels(self) -> int:
        """Channels of one packed input frame: RGB (3) then the flow stack (2L), those used."""
        return 3 * self.uses_rgb + 2 * self.flow_length * self.uses_flow


@dataclass
class SamplingConfig:
    """Clip sampling and augmentation (spec section 5)."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"frames": "train_positions"}

    train_positions: int = num(5, min=1)  # T frame positions per training clip
    stride_min: int = num(5, min=1)
    stride_max: int = num(15, min=1)
    input_size: int = num(224, min=16)
    crop_scale: tuple[float, float] = (0.75, 1.25)
    crop_placement: Literal["corner", "anywhere"] = "corner"
    flip: bool = True
    # median: subtract each flow image's median, taken over the whole frame before cropping
    flow_center: Literal["none", "median"] = "none"
    test_positions: int = num(25, min=1)
    # full_frame: the whole frame + its mirror, fully convolutionally (authors' denseEval)
    test_crops: Literal["center", "center_flip", "ten_crop", "full_frame"] = "center_flip"

    def check(self) -> None:
        if self.stride_min > self.stride_max:
            raise ConfigError(
                f"stride_min: got {self.stride_min}, expected <= stride_max ({self.stride_max})"
            )
        lo, hi = self.crop_scale
        if not 0 < lo <= hi:
            raise ConfigError(f"crop_scale: got {list(self.crop_scale)}, expected 0 < low <= high")


@dataclass
class TrainConfig:
    """Optimisation (spec section 6) and checkpointing."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"batch_size": "global_batch_size"}

    stage: Literal[0, 1, 2] = 1  # 0 = base stream, 1/2 = ST-ResNet stages (sets defaults in docs)
    epochs: int = num(1, min=1)
    steps_per_epoch: Optional[int] = num(None, min=1)  # None: one pass over the shards
    global_batch_size: int = num(128, min=1)  # clips per optimizer step over all workers
    lr: float = num(1e-3, min=0.0)
    # lr is divided by lr_decay at each of these optimizer steps and at the start of each of
    # these epochs (0-based; one epoch = one pass over the training set unless steps_per_epoch)
    lr_steps: list[int] = _list()
    lr_epochs: list[int] = _list()
    lr_decay: float = num(10.0, min=1.0)
    momentum: float = num(0.9, min=0.0, max=1.0)
    weight_decay: float = num(5e-4, min=0.0)  # never on biases and normalisation parameters
    bias_lr_factor: float = num(2.0, min=0.0)  # biases learn at this multiple of lr (code: 2)
    # per_step: a loss on every remaining time step, labels repeated (code); clip_mean: one loss
    # on the logits averaged over time
    loss: Literal["per_step", "clip_mean"] = "per_step"
    bf16: bool = True  # autocast on GPU; ignored on CPU
    channels_last: bool = True  # on GPU
    checkpoint_every: int = num(100, min=1)  # optimizer steps
    validate_every: int = num(1, min=1)  # epochs
    max_failures: int = num(3, min=0)  # worker failures Ray Train recovers from
    fail_at_step: Optional[int] = num(None, min=1)  # failure injection for tests: kill a worker
    stop_at_step: Optional[int] = num(None, min=1)  # end cleanly (checkpointed) after this step
    keep_checkpoints: Optional[int] = num(3, min=1)  # newest checkpoints kept; None keeps all
    storage_path: str = path("runs")  # shared filesystem on clusters
    run_name: Optional[str] = None  # None: a new unique name; set it to resume that run
    resume: bool = False

    def check(self) -> None:
        # The run folder is storage_path/run_name: a name with a path in it would escape it.
        if self.run_name is not None and (
            not self.run_name.strip() or "/" in self.run_name or "\\" in self.run_name
            or self.run_name in (".", "..")
        ):
            raise ConfigError(
                f"run_name: got {self.run_name!r}, expected a folder name (no '/', not '.' or '..')"
            )


@dataclass
class EvalConfig:
    """``stresnet evaluate``: where the report goes."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"batch_size": "batch_size_per_worker"}

    output: str = path("outputs/eval")
    batch_size_per_worker: int = num(4, min=1)  # evaluation clips per worker per batch
    fully_convolutional: bool = False  # stage 2: also run whole videos in one pass
    # What a video's score averages over its positions, views and (fused) streams: the
    # prediction layer's outputs (logits, the authors' code) or softmax probabilities.
    score_average: Literal["logits", "softmax"] = "logits"


def from_dict(cls: type, raw: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, checking every key and value against the hints."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    where = path + "." if path else ""
    renamed = getattr(cls, "RENAMED", {})
    for key in unknown:
        if key in renamed:
            raise ConfigError(f"{where}{key}: renamed to {where}{renamed[key]}")
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; allowed keys here: {sorted(fields)}"
        )
    values = {}
    for name, value in raw.items():
        key = f"{path}.{name}" if path else name
        values[name] = _convert(hints[name], value, key, fields[name].metadata)
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{path + '.' if path else ''}{err}") from None
    return obj


def _convert(hint: Any, value: Any, key: str, meta: Any = None) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, meta)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin is Literal:
        # bool is an int in Python: don't let `true` pass for a Literal[1, 2].
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{key}: got {_show(value)}, expected one of {list(args)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {_show(value)}, expected a list")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: got {_show(value)}, expected a list of {len(args)} values")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {_show(value)}, expected true or false")
        return value
    if hint in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is int and ok and not float(value).is_integer():
            ok = False
        if not ok:
            raise ConfigError(f"{key}: got {_show(value)}, expected {'an integer' if hint is int else 'a number'}")
        value = hint(value)
        if not math.isfinite(value):  # NaN passes every range check: compare nothing to it
            raise ConfigError(f"{key}: got {value}, expected a finite number")
        lo, hi = (meta or {}).get("min"), (meta or {}).get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"{'' if lo is None else lo} .. {'' if hi is None else hi}".strip()
            raise ConfigError(f"{key}: got {value}, expected a value in [{bounds}]")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {_show(value)}, expected a string")
        return value
    if hint is Any:
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


URI_SCHEME = re.compile(r"[a-zA-Z][\w+.-]*:/")  # models:/, s3://, http://, file:/, sqlite:///
SQLITE = "sqlite:///"


def absolute_paths(config: Any) -> Any:
    """A copy of ``config`` (any config dataclass) with every :func:`path` field made absolute.

    Ray workers do not share the driver's working directory, so a run resolves its paths once,
    on the driver. A new path field only has to be declared with :func:`path`.
    """
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = absolute_paths(value)
        elif f.metadata.get("path") and value is not None and value not in f.metadata["keep"]:
            changes[f.name] = _absolute(value)
    return dataclasses.replace(config, **changes)


def _absolute(value: str) -> str:
    if value.startswith(SQLITE) and not value.startswith(SQLITE + "/"):
        return SQLITE + str(Path(value[len(SQLITE):]).expanduser().resolve())
    if URI_SCHEME.match(value):
        return value
    return str(Path(value).expanduser().resolve())


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def to_dict(config: Any) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def flatten(config: Any) -> dict[str, Any]:
    """``{"model.depth": 50, ...}``: for logging the config as MLflow params."""
    return _flatten_dict(to_dict(config), "")


def _flatten_dict(d: dict, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


