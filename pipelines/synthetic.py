"""The bundled synthetic action dataset: small real videos whose classes test each part of the model.

Every video shows one object over a textured, slowly panning background with a little camera
jitter. Within a family the label depends on one cue, the part of the network under test; the
family itself is visible in both modalities, so that each stream can tell which family a video
belongs to and a fused score is not dragged into another family by a stream that cannot see the
class: in RGB by the object's *shape*, in the flow by the *kind of motion* (none, along an axis,
diagonal, interrupted).

1. ``appearance`` (disc): the colour decides (red / green / blue). The disc stands still in the
   scene (it moves on screen with the camera only), so one RGB frame suffices and the
   median-centred flow shows no object at all.
2. ``motion`` (square): the direction decides (left / right / up / down); the colour is random, so
   the RGB stream cannot tell the classes apart, flow can.
3. ``conjunction`` (triangle, moving diagonally): label = colour XOR direction (red up-right or
   green down-left vs red down-left or green up-right). Colour alone and direction alone are each
   at chance, and so is any late fusion of two independent streams; only features that combine
   colour and motion (the cross-stream connections) can do better. (Moving left/right like the
   squares, the triangles' flow was taken for the squares' by the motion stream, and the fused
   score followed it into the motion family.)
4. ``order`` (ring): hidden, moves right, hidden, moves back left vs hidden, left, hidden, right.
   Which motion comes first decides. Every local event (appear then move right, move right then
   vanish, the same for left) occurs once in either class, so a model that sees one position at
   a time (a flow stack, a frame) is at chance; only the order across positions (temporal
   convolutions) tells the classes apart. (With a visible pause instead of the hidden gap, a
   stack spanning "moves right, then stops" gave the class away.) The gap between the phases is
   at least 3 frames, so no flow stack of L <= 5 fields holds motion of both phases.

The labels are not mirror-symmetric: a horizontally flipped SquareMovesLeft clip is a
SquareMovesRight clip (likewise the order pair; a flipped conjunction clip moves along the other
diagonal, which no class has), so training configs on this dataset set ``sampling.flip: false``. The camera's pan and jitter move the whole frame by about as
much as the object moves; ``sampling.flow_center: median`` takes that out of the flow input.

Generation is deterministic from ``seed``: the same config writes the same decoded frames. Videos
alternate between H.264 in MP4 and MPEG-4 part 2 in AVI so that both decoder paths are exercised.
The folder gets UCF101-style split files, so ``pipelines.sources`` reads it like UCF101.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipelines.config import DatasetConfig, SyntheticConfig
from pipelines.video import write_video
from stresnet.config import to_dict

MARKER = "synthetic.json"  # written last: its presence means the dataset is complete
# Bumped whenever rendering changes, so a folder written by older code is refused, not reused.
# 2: larger objects (radius 7.5-9.5 px at 64 px); the order family hides the object between
# and around its two motions. 4: the disc stands still, the triangle moves diagonally.
GENERATOR_VERSION = 4

COLOURS = {  # BGR
    "red": (40, 40, 220),
    "green": (40, 200, 40),
    "blue": (230, 90, 40),
    "yellow": (40, 210, 230),
    "magenta": (200, 50, 200),
    "cyan": (210, 200, 40),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
DIAGONALS = {"up_right": (math.sqrt(0.5), -math.sqrt(0.5)), "down_left": (-math.sqrt(0.5), math.sqrt(0.5))}


@dataclass(frozen=True)
class SyntheticClass:
    name: str
    family: str
    shape: str  # disc, square, triangle, ring
    colours: tuple[str, ...]  # drawn uniformly
    # motion: "still", a direction name, "xor" (a diagonal that follows the colour), or
    # "right_left" / "left_right" (the order family)
    motion: str
    xor_pairs: tuple[tuple[str, str], ...] = ()  # conjunction: allowed (colour, direction) pairs


FAMILY_CLASSES: dict[str, list[SyntheticClass]] = {
    "appearance": [
        SyntheticClass(f"{c.capitalize()}Disc", "appearance", "disc", (c,), "still")
        for c in ("red", "green", "blue")
    ],
    "motion": [
        SyntheticClass(f"SquareMoves{d.capitalize()}", "motion", "square", tuple(COLOURS), d)
        for d in DIRECTIONS
    ],
    "conjunction": [
        SyntheticClass("RedUpRightOrGreenDownLeft", "conjunction", "triangle", ("red", "green"),
                       "xor", (("red", "up_right"), ("green", "down_left"))),
        SyntheticClass("RedDownLeftOrGreenUpRight", "conjunction", "triangle", ("red", "green"),
                       "xor", (("red", "down_left"), ("green", "up_right"))),
    ],
    "order": [
        SyntheticClass("RingRightThenLeft", "order", "ring", tuple(COLOURS), "right_left"),
        SyntheticClass("RingLeftThenRight", "order", "ring", tuple(COLOURS), "left_right"),
    ],
}


def class_families(class_names: list[str]) -> dict[str, str]:
    """``{class: family}`` for those of ``class_names`` that are synthetic classes."""
    family_of = {c.name: family for family, classes in FAMILY_CLASSES.items() for c in classes}
    return {name: family_of[name] for name in class_names if name in family_of}


def synthetic_classes(cfg: SyntheticConfig) -> list[SyntheticClass]:
    """The classes of the configured families, in label order."""
    return [c for family in cfg.families for c in FAMILY_CLASSES[family]]


def write_synthetic_dataset(cfg: DatasetConfig) -> Path:
    """Write the videos and UCF101-style split files under ``cfg.root``; return that folder.

    Does nothing when the folder already holds this exact dataset; refuses to overwrite a folder
    made with different settings.
    """
    syn = cfg.synthetic
    root = Path(cfg.root)
    params = {**to_dict(syn), "generator_version": GENERATOR_VERSION}
    marker = root / MARKER
    if marker.is_file():
        existing = json.loads(marker.read_text())
        if existing == params:
            return root
        raise FileExistsError(
            f"{marker}: the synthetic dataset there was made with other settings "
            f"({existing}); delete the folder or set dataset.root to another folder"
        )
    classes = synthetic_classes(syn)
    # At least one test and one train video per class whenever there is a test split at all.
    n_test = round(syn.videos_per_class * syn.test_fraction)
    if syn.test_fraction > 0:
        n_test = min(max(n_test, 1), syn.videos_per_class - 1)
    every_class = [c.name for family in FAMILY_CLASSES.values() for c in family]
    train_lines, test_lines = [], []
    for label, cls in enumerate(classes):
        (root / cls.name).mkdir(parents=True, exist_ok=True)
        for v in range(syn.videos_per_class):
            # Seeded by the class's place among *all* classes: a class looks the same whichever
            # families are selected.
            rng = np.random.default_rng([syn.seed, every_class.index(cls.name), v])
            frames = render_video(cls, rng, syn.video_frames, syn.height, syn.width)
            ext = ".mp4" if v % 2 == 0 else ".avi"
            rel = f"{cls.name}/v_{cls.name}_g{v + 1:02d}_c01{ext}"
            # Write under a private name, then rename: tasks generating the same dataset at once
            # (e.g. a job array) never see a half-written file.
            tmp = root / cls.name / f".{os.getpid()}.{Path(rel).name}"
            write_video(tmp, frames, syn.fps)
            os.replace(tmp, root / rel)
            if v < syn.videos_per_class - n_test:
                train_lines.append(f"{rel} {label + 1}")
            else:
                test_lines.append(rel)
    (root / "classInd.txt").write_text("".join(f"{i + 1} {c.name}\n" for i, c in enumerate(classes)))
    (root / "trainlist01.txt").write_text("".join(line + "\n" for line in train_lines))
    (root / "testlist01.txt").write_text("".join(line + "\n" for line in test_lines))
    marker.write_text(json.dumps(params, indent=1))
    return root


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth, low-saturation random texture (BGR uint8) with fine grain, so flow has detail."""
    coarse = rng.random((max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    grey = smooth.mean(axis=2, keepdims=True)
    image = 70 + 90 * grey + 25 * (smooth - grey) + rng.normal(0, 6, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def render_video(
    cls: SyntheticClass, rng: np.random.Generator, frames: int, height: int, width: int
) -> np.ndarray:
    """One video of class ``cls``: (frames, height, width, 3) BGR uint8."""
    scale = min(height, width) / 64.0
    colour_name = str(rng.choice(cls.colours))
    colour = np.clip(np.array(COLOURS[colour_name]) + rng.integers(-15, 16, 3), 0, 255)
    radius = rng.uniform(7.5, 9.5) * scale

    # Object motion in the scene: a unit direction and a speed in px/frame.
    if cls.motion == "still":
        direction, speed = (0.0, 0.0), 0.0
    elif cls.motion == "xor":
        direction = DIAGONALS[dict(cls.xor_pairs)[colour_name]]
        speed = rng.uniform(1.0, 1.6) * scale
    elif cls.motion in ("right_left", "left_right"):
        direction = DIRECTIONS["right" if cls.motion == "right_left" else "left"]
        speed = rng.uniform(1.2, 2.0) * scale
    else:
        direction = DIRECTIONS[cls.motion]
        speed = rng.uniform(1.0, 1.6) * scale
    t = np.arange(frames, dtype=np.float64)
    visible = np.ones(frames, dtype=bool)
    if cls.motion in ("right_left", "left_right"):
        # Hidden, out, hidden, back, hidden (see order_timing): the object holds still while hidden.
        first, length, second = order_timing(frames)
        t = np.clip(t - first, 0, length - 1) - np.clip(t - second, 0, length - 1)
        visible[:] = False
        visible[first : first + length] = visible[second : second + length] = True
    travel_x, travel_y = direction[0] * speed * t, direction[1] * speed * t

    # Camera: a slow pan plus jitter, applied to the whole scene (background and object).
    margin = int(math.ceil(0.3 * scale * frames + 2 * scale)) + 2
    texture = textured_background(rng, height + 2 * margin, width + 2 * margin)
    pan = rng.uniform(-0.3, 0.3, 2) * scale
    jitter = np.clip(rng.normal(0, 0.4 * scale, (frames, 2)), -scale, scale)
    camera = pan[None, :] * np.arange(frames)[:, None] + jitter
    # Where the object appears on screen: its own path minus the camera's, kept in view.
    screen = fit_path(np.stack([travel_x, travel_y], axis=1) - camera, radius, height, width, rng)

    video = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        cx, cy = camera[i]
        shift = np.float32([[1, 0, -margin - cx], [0, 1, -margin - cy]])
        frame = cv2.warpAffine(texture, shift, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
        if visible[i]:
            draw_shape(frame, cls.shape, screen[i], radius, colour)
        video[i] = frame
    return video


def order_timing(frames: int) -> tuple[int, int, int]:
    """The order family's schedule: (first frame of phase 1, frames per phase, first frame of
    phase 2). The object is hidden for ``max(1, frames // 12)`` frames before phase 1 and at least
    as many after phase 2, and for ``max(3, frames // 4)`` frames between the phases.
    """
    edge, gap = max(1, frames // 12), max(3, frames // 4)
    length = max(2, (frames - 2 * edge - gap) // 2)
    return edge, length, edge + length + gap


def fit_path(
    path: np.ndarray, radius: float, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    """Shift a relative path to a random start so that the object stays in view throughout.

    A path longer than the frame is shrunk towards its start (slower motion, same direction).
    """
    lo = np.array([radius + 2, radius + 2])
    hi = np.array([width - radius - 2, height - radius - 2])
    span = path.max(axis=0) - path.min(axis=0)
    shrink = np.min(np.where(span > 0, (hi - lo) / np.maximum(span, 1e-9), np.inf))
    if shrink < 1:
        path = path * shrink
    low_start = lo - path.min(axis=0)
    high_start = hi - path.max(axis=0)
    start = rng.uniform(low_start, np.maximum(low_start, high_start))
    return path + start


def draw_shape(frame: np.ndarray, shape: str, centre: np.ndarray, radius: float, colour) -> None:
    """Draw an anti-aliased shape with sub-pixel position (4 fractional bits) into ``frame``."""
    bits = 4
    colour = tuple(int(c) for c in colour)
    c = np.round(np.asarray(centre) * (1 << bits)).astype(np.int32)
    r = int(round(radius * (1 << bits)))
    if shape == "disc":
        cv2.circle(frame, (int(c[0]), int(c[1])), r, colour, -1, cv2.LINE_AA, bits)
    elif shape == "ring":
        thickness = max(2, int(round(radius / 3)))
        cv2.circle(frame, (int(c[0]), int(c[1])), r - (thickness << bits) // 2, colour, thickness,
                   cv2.LINE_AA, bits)
    else:
        sides, turn = {"square": (4, math.pi / 4), "triangle": (3, -math.pi / 2)}[shape]
        angles = turn + 2 * math.pi * np.arange(sides) / sides
        points = c + r * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        cv2.fillPoly(frame, [np.round(points).astype(np.int32)], colour, cv2.LINE_AA, bits)
