"""Which frames, which crop, which flip: the clip sampling of spec section 5, for both loaders.

Everything here is a pure function of the config, the video's size and ``(seed, epoch, video_id)``,
so the DALI loader and the CPU loader (and a rawframes baseline) compute the *same* clip plan for
the same video and epoch; they only differ in how they read and decode the JPEGs.

Frame and flow indexing follows ``pipelines/shard_format.py``: a video has ``num_frames`` RGB frames
and ``num_frames - 1`` flow fields; field ``i`` is the motion from frame ``i`` to ``i + 1``. The
flow stack of a position ``t`` is the ``L`` fields ``t - L//2 .. t + L - L//2 - 1`` (spec section 1:
frames t-L/2 .. t+L/2-1), clamped to the fields that exist.

Network input (``normalize_clip``):

- RGB: ``(byte / 255 - mean) / std`` with the ImageNet statistics torchvision models expect.
- Flow: ``(byte - centre) / FLOW_SCALE`` where ``centre`` is 128 (spec) or the per-channel median of
  that flow image (``sampling.flow_center: median``, the authors' ``subMedian``: removes camera
  motion). ``FLOW_SCALE = 255 * mean(ImageNet std)`` ~= 57.6: the authors feed ``byte - 128`` to a
  network whose RGB input is ``byte - mean`` (no std division); torchvision's RGB input is further
  divided by ``255 * std``, so dividing flow by the same factor keeps the authors' ratio between the
  two modalities, which the cross-modality conv1 init (averaged RGB filters) relies on. In pixels,
  one input unit is ``FLOW_SCALE * 2 * flow_bound / 255`` (~9 px for bound 20).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from stresnet.config import SamplingConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_SCALE = 255.0 * sum(IMAGENET_STD) / 3.0

# f25noCtr (authors' code): the crop's offset inside the free margin is a fraction in [0, .25] or
# [.75, 1] of that margin, i.e. near a border, never in the centre.
CORNER_BAND = 0.25


@dataclass(frozen=True)
class CropBox:
    """A crop in frame pixels: columns x .. x+w-1, rows y .. y+h-1."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class ClipPlan:
    """Everything a loader needs to build one clip: frames, flow fields, crop and flip.

    ``flow_indices[k]`` are the ``L`` flow fields stacked for ``positions[k]``. ``flip`` means the
    crop is mirrored horizontally and flow-x negated (``normalize_clip`` does the negation).
    """

    positions: tuple[int, ...]
    flow_indices: tuple[tuple[int, ...], ...]
    box: CropBox
    flip: bool


def clip_rng(seed: int, epoch: int, video_id: str) -> np.random.Generator:
    """The random stream of one clip: the same on every process, loader and Python run."""
    digest = hashlib.blake2b(video_id.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, epoch, int.from_bytes(digest, "little")])


def flow_offsets(flow_length: int) -> range:
    """Offsets of the flow stack around a position: -L//2 .. L - L//2 - 1 (spec: t-L/2..t+L/2-1)."""
    return range(-(flow_length // 2), flow_length - flow_length // 2)


def valid_range(num_frames: int, flow_length: int) -> tuple[int, int]:
    """First and last position whose whole flow stack exists; the whole video if none does."""
    offsets = flow_offsets(flow_length)
    first = -offsets[0]
    last = (num_frames - 2) - offsets[-1]  # the last flow field is num_frames - 2
    if last < first:  # video shorter than one flow stack: use every frame, flow gets clamped
        return 0, num_frames - 1
    return first, last


def flow_indices(position: int, num_frames: int, flow_length: int) -> tuple[int, ...]:
    """The ``L`` flow fields stacked for ``position``, clamped to the ``num_frames - 1`` fields."""
    last_field = max(num_frames - 2, 0)
    return tuple(min(max(position + o, 0), last_field) for o in flow_offsets(flow_length))


def train_positions(
    num_frames: int, frames: int, stride_min: int, stride_max: int, flow_length: int,
    rng: np.random.Generator,
) -> list[int]:
    """``frames`` positions with a stride drawn from [stride_min, stride_max] at a random start.

    Short videos never fail: the stride shrinks until the clip fits the valid range; if even
    stride 1 does not fit, positions spread evenly over the range and repeat frames.
    """
    first, last = valid_range(num_frames, flow_length)
    room = last - first
    stride = int(rng.integers(stride_min, stride_max + 1))
    if frames > 1:
        stride = min(stride, room // (frames - 1))
    if stride >= 1 or frames == 1:
        span = stride * (frames - 1)
        start = first + int(rng.integers(0, room - span + 1))
        return [start + k * stride for k in range(frames)]
    return [int(p) for p in np.rint(np.linspace(first, last, frames))]


def eval_positions(num_frames: int, count: int | None, flow_length: int) -> list[int]:
    """``count`` positions evenly over the valid range; ``None``: every position (whole video)."""
    first, last = valid_range(num_frames, flow_length)
    if count is None:
        return list(range(first, last + 1))
    return [int(p) for p in np.rint(np.linspace(first, last, count))]


def train_crop(
    height: int, width: int, cfg: SamplingConfig, rng: np.random.Generator
) -> tuple[CropBox, bool]:
    """One crop box and flip per clip: each side input_size * U(crop_scale), clipped to the frame.

    ``corner``: the offset inside the free margin is near a border in both directions, one of the
    four corner regions (the authors' ``f25noCtr`` draws from a grid in two diagonal corners and
    relies on flipping for the other two; drawing the side of each axis independently gives the
    same distribution without the grid). ``anywhere``: uniform over the margin.
    """
    lo, hi = cfg.crop_scale
    w = min(width, max(1, round(cfg.input_size * rng.uniform(lo, hi))))
    h = min(height, max(1, round(cfg.input_size * rng.uniform(lo, hi))))
    fx, fy = rng.uniform(0.0, 1.0, size=2)
    if cfg.crop_placement == "corner":
        high = rng.integers(0, 2, size=2)  # which border, per axis
        fx = (1 - CORNER_BAND + fx * CORNER_BAND) if high[0] else fx * CORNER_BAND
        fy = (1 - CORNER_BAND + fy * CORNER_BAND) if high[1] else fy * CORNER_BAND
    x = math.floor((width - w) * fx)
    y = math.floor((height - h) * fy)
    flip = bool(cfg.flip and rng.uniform() < 0.5)
    return CropBox(x, y, w, h), flip


def eval_views(height: int, width: int, cfg: SamplingConfig) -> list[tuple[CropBox, bool]]:
    """The evaluation views of a video: centre crop (``center``), plus its mirror
    (``center_flip``), or four corners + centre and their mirrors (``ten_crop``).

    The crop is input_size square, clipped to the frame (then resized like training crops).
    """
    w, h = min(cfg.input_size, width), min(cfg.input_size, height)
    center = CropBox((width - w) // 2, (height - h) // 2, w, h)
    if cfg.test_crops == "center":
        return [(center, False)]
    if cfg.test_crops == "center_flip":
        return [(center, False), (center, True)]
    corners = [CropBox(x, y, w, h) for y in (0, height - h) for x in (0, width - w)]
    return [(box, flip) for flip in (False, True) for box in corners + [center]]


def train_plan(
    cfg: SamplingConfig, flow_length: int, seed: int, epoch: int, video_id: str,
    num_frames: int, height: int, width: int,
) -> ClipPlan:
    """The training clip of ``video_id`` in ``epoch``: a function of (seed, epoch, video_id)."""
    rng = clip_rng(seed, epoch, video_id)
    positions = train_positions(
        num_frames, cfg.train_positions, cfg.stride_min, cfg.stride_max, flow_length, rng
    )
    box, flip = train_crop(height, width, cfg, rng)
    return _plan(positions, num_frames, flow_length, box, flip)


def eval_plan(
    cfg: SamplingConfig, flow_length: int, view: int, num_frames: int, height: int, width: int,
    whole_video: bool = False,
) -> ClipPlan:
    """View ``view`` of a test video: ``test_positions`` uniform positions or the whole video."""
    positions = eval_positions(
        num_frames, None if whole_video else cfg.test_positions, flow_length
    )
    box, flip = eval_views(height, width, cfg)[view]
    return _plan(positions, num_frames, flow_length, box, flip)


def _plan(
    positions: list[int], num_frames: int, flow_length: int, box: CropBox, flip: bool
) -> ClipPlan:
    stacks = tuple(flow_indices(p, num_frames, flow_length) for p in positions)
    return ClipPlan(tuple(positions), stacks, box, flip)


def normalize_clip(
    rgb: torch.Tensor | None, flow: torch.Tensor | None, flip: torch.Tensor, flow_center: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """uint8 crops from a loader -> network input, on whatever device the crops are.

    ``rgb`` (B, T, S, S, 3) and ``flow`` (B, T, S, S, 2L) are the resized (and, where ``flip``,
    already mirrored) crops with flow channels interleaved x1, y1, x2, y2, ...; ``flip`` (B,) bool.
    Returns float32 ``(B, T, 3, S, S)`` and ``(B, T, 2L, S, S)``.
    """
    out_rgb = out_flow = None
    if rgb is not None:
        mean = torch.tensor(IMAGENET_MEAN, device=rgb.device) * 255.0
        std = torch.tensor(IMAGENET_STD, device=rgb.device) * 255.0
        out_rgb = ((rgb.float() - mean) / std).permute(0, 1, 4, 2, 3).contiguous()
    if flow is not None:
        values = flow.float()
        # A mirrored image moves the other way: negate x, in bytes x -> 255 - x (spec section 5).
        negate = flip.to(values.device).view(-1, 1, 1, 1, 1) & _is_x_channel(flow)
        values = torch.where(negate, 255.0 - values, values)
        if flow_center == "median":
            b, t, s1, s2, c = values.shape
            centre = values.reshape(b, t, s1 * s2, c).median(dim=2).values.view(b, t, 1, 1, c)
        else:
            centre = 128.0
        out_flow = ((values - centre) / FLOW_SCALE).permute(0, 1, 4, 2, 3).contiguous()
    return out_rgb, out_flow


def _is_x_channel(flow: torch.Tensor) -> torch.Tensor:
    channels = flow.shape[-1]
    return (torch.arange(channels, device=flow.device) % 2 == 0).view(1, 1, 1, 1, channels)
