"""A COCO-format detection source: ``instances_SPLIT.json`` and its image folder, checked in full.

The same bad-input policy as the classification sources: every image is decoded, every annotation
checked against its image and the categories, and every problem listed as (path, reason) — an
unreadable or missing image, a box outside its image or of zero area, an unknown category id, an
image without annotations — for ``data.on_bad_file`` to stop on or to leave out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.prepare import image_problem


@dataclass
class CocoSplit:
    categories: list[str]  # label i is the i-th category by id
    images: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)  # (file, boxes xyxy, labels)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _box_problem(bbox, width: int, height: int) -> str | None:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        return f"bbox {bbox!r} is not [x, y, width, height]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has zero area"
    if x < 0 or y < 0 or x + w > width or y + h > height:
        return f"bbox {bbox} lies outside the {width}x{height} image"
    return None


def read_split(annotations: Path, image_dir: Path) -> CocoSplit:
    """The images of one split with their boxes (x1, y1, x2, y2) and labels, and every problem found."""
    try:
        coco = json.loads(annotations.read_text())
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        entries, objects = coco["images"], coco["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return CocoSplit([], problems=[(str(annotations), f"not a COCO instances file: {err}")])
    ids = sorted(categories)
    label_of = {cid: i for i, cid in enumerate(ids)}
    split = CocoSplit([categories[i] for i in ids])
    by_image: dict[int, list] = {}
    for ann in objects:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    for entry in entries:
        path = image_dir / entry["file_name"]
        reasons = []
        if not path.is_file():
            reasons.append("missing image file")
        elif problem := image_problem(path):
            reasons.append(problem)
        anns = by_image.get(entry["id"], [])
        if not anns:
            reasons.append("no annotations")
        boxes, labels = [], []
        for ann in anns:
            if ann.get("category_id") not in label_of:
                reasons.append(f"annotation {ann.get('id')}: unknown category_id {ann.get('category_id')!r}")
            elif problem := _box_problem(ann.get("bbox"), entry["width"], entry["height"]):
                reasons.append(f"annotation {ann.get('id')}: {problem}")
            else:
                x, y, w, h = ann["bbox"]
                boxes.append([x, y, x + w, y + h])
                labels.append(label_of[ann["category_id"]])
        split.problems += [(str(path), reason) for reason in reasons]
        if not reasons:
            split.images.append(
                (entry["file_name"], np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64))
            )
    return split
