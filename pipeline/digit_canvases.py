"""A detection set made of real digits: canvases with several MNIST digits each, at varied scales and
positions, with a tight box and a class per digit.

It lets the default machine train detectors on real pixels (the bundled digits, split first so no
digit is in both train and val canvases). Digits are scaled over a range wide enough that the FPN's
levels see different objects (at 128 px: 12-64 px digits, i.e. P3 to P5 anchors), placed so that
two boxes overlap by at most ``max_iou``, and drawn with the brighter pixel winning where they
touch. The same digits, count, size and seed give the same canvases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

INK = 64  # a pixel of a digit's box: its value after scaling is at least this (of 255)
PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class Canvases:
    images: np.ndarray  # (N, size, size) uint8
    boxes: list[np.ndarray]  # per canvas: (n, 4) float32, x1 y1 x2 y2 in pixels, x2 and y2 exclusive
    labels: list[np.ndarray]  # per canvas: (n,) int64, the digit


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    if not len(others):
        return np.zeros(0)
    lo, hi = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    return inter / (area + np.prod(others[:, 2:] - others[:, :2], axis=1) - inter)


def _ink_box(digit: np.ndarray) -> tuple[int, int, int, int] | None:
    """The tight box (x1, y1, x2, y2) around a scaled digit's ink; None if it has none."""
    rows, cols = np.nonzero(digit >= INK)
    if not len(rows):
        return None
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def compose(
    digits: np.ndarray,
    classes: np.ndarray,
    count: int,
    size: int = 128,
    per_canvas: tuple[int, int] = (1, 5),
    scales: tuple[int, int] = (12, 64),
    max_iou: float = 0.1,
    seed: int = 0,
) -> Canvases:
    """``count`` canvases of ``size`` px, each with ``per_canvas`` (inclusive range) of ``digits``
    ((M, 28, 28) uint8, ink bright on black) drawn at ``scales`` px (inclusive range)."""
    if not (0 < per_canvas[0] <= per_canvas[1]) or not (0 < scales[0] <= scales[1] <= size):
        raise ValueError(
            f"need 0 < per_canvas low <= high and 0 < scales low <= high <= size; got {per_canvas}, {scales}"
        )
    rng = np.random.default_rng(seed)
    images = np.zeros((count, size, size), dtype=np.uint8)
    all_boxes, all_labels = [], []
    for canvas in images:
        boxes, labels = [], []
        for _ in range(rng.integers(per_canvas[0], per_canvas[1] + 1)):
            index = rng.integers(len(digits))
            scale = int(rng.integers(scales[0], scales[1] + 1))
            digit = np.asarray(Image.fromarray(digits[index]).resize((scale, scale), Image.BILINEAR))
            ink = _ink_box(digit)
            if ink is None:
                continue
            for _ in range(PLACEMENT_TRIES):
                x, y = rng.integers(0, size - scale + 1, size=2)
                box = np.array([x + ink[0], y + ink[1], x + ink[2], y + ink[3]], dtype=np.float32)
                if (_iou(box, np.array(boxes).reshape(-1, 4)) <= max_iou).all():
                    window = canvas[y : y + scale, x : x + scale]
                    np.maximum(window, digit, out=window)
                    boxes.append(box)
                    labels.append(classes[index])
                    break
        all_boxes.append(np.array(boxes, dtype=np.float32).reshape(-1, 4))
        all_labels.append(np.array(labels, dtype=np.int64))
    return Canvases(images, all_boxes, all_labels)
