"""Optical flow between consecutive frames: TV-L1 (the paper's choice) or Farneback (fast).

Flow field ``i`` is the motion from frame ``i`` to frame ``i + 1``, in pixels, as an array
``(H, W, 2)`` with x (rightwards) then y (downwards) components; ``N`` frames give ``N - 1``
fields. The last frame has none (see ``pipelines/shard_format.py``).
"""

from __future__ import annotations

from typing import Iterator, Literal

import cv2
import numpy as np

FlowMethod = Literal["tvl1", "farneback"]

# Farneback settings from OpenCV's own optical-flow sample (5-level pyramid, 15 px window).
FARNEBACK = dict(pyr_scale=0.5, levels=5, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2)


class FlowEstimator:
    """Computes flow for a whole clip. Build one per process: TV-L1 keeps buffers between calls.

    TV-L1 uses OpenCV's defaults (tau 0.25, lambda 0.15, theta 0.3, 5 scales, 5 warps, 10 outer
    and 30 inner iterations) except the stopping threshold ``epsilon``: OpenCV's 0.01 almost
    never stops early; 0.05 is 6-7x faster and still within a few hundredths of a pixel on
    textured translations (benchmarks/shards.py).
    """

    def __init__(self, method: FlowMethod = "tvl1", tvl1_epsilon: float = 0.01) -> None:
        if method not in ("tvl1", "farneback"):
            raise ValueError(f"flow method {method!r}: expected 'tvl1' or 'farneback'")
        self.method = method
        self._tvl1 = (
            cv2.optflow.DualTVL1OpticalFlow_create(epsilon=tvl1_epsilon)
            if method == "tvl1"
            else None
        )

    def pair(self, gray0: np.ndarray, gray1: np.ndarray) -> np.ndarray:
        """Flow (H, W, 2) float32 from grayscale ``gray0`` to ``gray1``."""
        if self._tvl1 is not None:
            return self._tvl1.calc(gray0, gray1, None)
        return cv2.calcOpticalFlowFarneback(gray0, gray1, None, flags=0, **FARNEBACK)

    def fields(self, frames: np.ndarray) -> Iterator[np.ndarray]:
        """BGR frames (N, H, W, 3) uint8 -> the N - 1 flow fields (H, W, 2) float32, one at a time.

        A generator, so that a long video never holds all its float flow in memory at once.
        """
        previous = cv2.cvtColor(frames[0], cv2.COLOR_BGR2GRAY)
        for frame in frames[1:]:
            current = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            yield self.pair(previous, current)
            previous = current
