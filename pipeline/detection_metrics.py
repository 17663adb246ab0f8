"""COCO mAP of a detector's predictions, through torchmetrics' ``MeanAveragePrecision`` (pycocotools'
evaluation): mAP over IoU 0.50:0.95, mAP@50, mAP@75 and mAP of small, medium and large objects,
the columns of the paper's Table 2."""

from __future__ import annotations

import math

COLUMNS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")


def map_metric():
    """A fresh ``MeanAveragePrecision`` over xyxy boxes (it accumulates across ``update`` calls and ranks)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    # a detector keeps up to 300 boxes per image; COCO scores its best 100, as this does, without a warning each time
    metric.warn_on_many_detections = False
    return metric


def summary(result: dict) -> dict[str, float]:
    """Table 2's columns of a computed metric; a size class no object falls in is NaN (COCO's -1)."""
    return {key: (math.nan if float(result[key]) < 0 else float(result[key])) for key in COLUMNS}


def coco_map(predictions: list[dict], targets: list[dict]) -> dict[str, float]:
    """``predictions``: per image ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,); ``targets``:
    per image ``boxes`` and ``labels``."""
    metric = map_metric()
    metric.update(predictions, targets)
    return summary(metric.compute())
