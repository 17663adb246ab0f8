"""COCO mAP on hand-made predictions: what the known boxes must score."""

import math

import pytest
import torch

from pipeline.detection_metrics import coco_map


def _target(*boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return {"boxes": boxes, "labels": torch.tensor(labels or [1] * len(boxes))}


def _prediction(*boxes, scores=None, labels=None):
    return {**_target(*boxes, labels=labels), "scores": torch.tensor(scores or [0.9] * len(boxes))}


def test_perfect_boxes_score_one_at_every_threshold():
    targets = [_target([10, 10, 50, 50], [60, 60, 100, 110]), _target([0, 0, 20, 30], labels=[2])]
    predictions = [_prediction([10, 10, 50, 50], [60, 60, 100, 110]), _prediction([0, 0, 20, 30], labels=[2])]
    result = coco_map(predictions, targets)
    assert result["map"] == result["map_50"] == result["map_75"] == pytest.approx(1.0)
    assert result["map_medium"] == pytest.approx(1.0) and math.isnan(result["map_large"])  # no object over 96^2 px


def test_a_box_shifted_to_iou_two_thirds_counts_at_four_of_ten_thresholds():
    """Shifted by 1/5 of its width, a box overlaps its object by IoU 40/60: a match at IoU 0.50, 0.55,
    0.60 and 0.65 of COCO's ten thresholds, so mAP 0.4, mAP@50 1 and mAP@75 0."""
    result = coco_map([_prediction([10, 0, 60, 50])], [_target([0, 0, 50, 50])])
    assert result["map"] == pytest.approx(0.4) and result["map_50"] == pytest.approx(1.0) and result["map_75"] == 0


def test_a_wrong_class_or_a_missed_object_scores_nothing():
    assert coco_map([_prediction([0, 0, 50, 50], labels=[3])], [_target([0, 0, 50, 50])])["map"] == 0
    half = coco_map([_prediction([0, 0, 50, 50])], [_target([0, 0, 50, 50], [100, 100, 150, 150])])
    assert half["map"] == pytest.approx(0.5, abs=0.01)  # recall 1/2 at precision 1
