"""The shard format, in one place: what the shard writer writes and both loaders read.

One WebDataset sample per video; the sample key is the video id (no dots, unique in the dataset).
Members of sample ``KEY``:

- ``KEY.json``: ``{"video_id", "label", "class_name", "split", "num_frames", "fps", "height",
  "width", "flow_bound", "flow_method", "source"}``
- ``KEY.rgb.00000.jpg`` .. : the RGB frames, ``num_frames`` of them, index zero-padded to 5 digits
- ``KEY.flow_x.00000.jpg``, ``KEY.flow_y.00000.jpg`` .. : optical flow, ``num_frames - 1`` of
  each. Flow field ``i`` is the motion from frame ``i`` to frame ``i + 1`` (it *belongs* to frame
  ``i``); the last frame has none, so a sampler asking for flow ``i >= num_frames - 1`` clamps to
  the last field. Each component is 8-bit grayscale: ``byte = round((clip(v, -B, B) + B) * 255 /
  (2B))`` with ``B = flow_bound`` pixels.

Shards hold one split each and are named ``{split}-p{partition:03d}-{index:05d}.tar``.
``manifest.json`` in the same folder lists classes, shards per split with their sample counts,
creation parameters, library versions and failures (see ``docs/shard-format.md``).

Beside each shard ``NAME.tar`` the writer puts its index ``NAME.tar.idx``: where each member's
bytes are, so a reader seeks straight to them instead of walking the tar headers. It is UTF-8
JSON: ``{"format": INDEX_FORMAT, "tar_size": bytes of the tar, "members": [[name, data offset,
size, crc32], ...]}`` with the members in tar order; ``crc32`` (``zlib.crc32`` of the member's
data) lets a reader tell a damaged member from a whole one (index files written before it was
added have three fields per member, and their members are read unchecked). Readers must treat it as a hint: a shard without one
(made by another tool), or whose index does not match the tar, is read by scanning its headers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT_VERSION = "stresnet-shards/1"
MANIFEST = "manifest.json"
INDEX_FORMAT = "stresnet-shard-index/1"
INDEX_SUFFIX = ".idx"


def rgb_member(index: int) -> str:
    return f"rgb.{index:05d}.jpg"


def flow_members(index: int) -> tuple[str, str]:
    return f"flow_x.{index:05d}.jpg", f"flow_y.{index:05d}.jpg"


def shard_name(split: str, partition: int, index: int) -> str:
    return f"{split}-p{partition:03d}-{index:05d}.tar"


def index_name(shard: str) -> str:
    """The index file of shard ``shard``: ``train-p000-00000.tar`` -> ``train-p000-00000.tar.idx``."""
    return shard + INDEX_SUFFIX


def quantize_flow(flow: np.ndarray, bound: float) -> np.ndarray:
    """Flow in pixels (any shape) -> uint8, clipped to [-bound, bound] (spec section 1)."""
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    return np.rint(scaled).astype(np.uint8)


def dequantize_flow(data: np.ndarray, bound: float) -> np.ndarray:
    """uint8 -> flow in pixels; the round trip is exact to half a step (bound / 127.5 / 2)."""
    return data.astype(np.float32) * (2.0 * bound / 255.0) - bound


def read_manifest(folder: str | Path) -> dict:
    """Load ``manifest.json`` of a shard folder, with a clear error when it is not there."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no shard manifest; run `stresnet shards --config ...` to create the shards"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); run `stresnet shards` again to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        manifest = manifest if isinstance(manifest, dict) else {}
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION!r}")
    return manifest


def model_shard_info(manifest: dict) -> dict:
    """What a saved model keeps of its training shards' manifest: class names and the creation
    parameters (flow method, bound, resolution, frame rate), so predictions on new videos can
    name classes and compute inputs like the shards without the shard folder."""
    return {"classes": list(manifest["classes"]), "params": manifest["params"]}
