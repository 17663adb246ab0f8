"""A tiny COCO folder written here loads, and each kind of bad annotation is reported by path."""

import json

import numpy as np
from PIL import Image

from pipeline.coco_source import read_split


def _write(folder, images, annotations, categories=({"id": 1, "name": "digit"}, {"id": 7, "name": "box"})):
    (folder / "images").mkdir()
    for entry in images:
        Image.new("RGB", (entry["width"], entry["height"]), (20, 40, 60)).save(folder / "images" / entry["file_name"])
    (folder / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": list(categories)})
    )
    return folder / "instances_train.json", folder / "images"


def _image(i, w=64, h=48):
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def test_a_good_folder_loads_with_xyxy_boxes_and_contiguous_labels(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 20]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 48]},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5.5, 6, 1, 1]},
    ]
    split = read_split(*_write(tmp_path, [_image(1), _image(2)], anns))
    assert split.problems == [] and split.categories == ["digit", "box"]
    (f1, boxes1, labels1), (f2, boxes2, labels2) = split.images
    assert f1 == "1.png" and np.array_equal(boxes1, [[2, 3, 12, 23], [0, 0, 64, 48]]) and labels1.tolist() == [1, 0]
    assert np.array_equal(boxes2, [[5.5, 6, 6.5, 7]]) and labels2.tolist() == [0]


def test_each_kind_of_bad_annotation_is_reported_by_path(tmp_path):
    images = [_image(i) for i in range(1, 7)]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [60, 0, 10, 10]},  # outside: 60 + 10 > 64
        {"id": 11, "image_id": 2, "category_id": 1, "bbox": [0, 0, 0, 5]},  # zero area
        {"id": 12, "image_id": 3, "category_id": 3, "bbox": [0, 0, 5, 5]},  # unknown category
        {"id": 13, "image_id": 5, "category_id": 1, "bbox": [0, 0, 5, 5]},
        {"id": 14, "image_id": 6, "category_id": 1, "bbox": [0, 0, 5, 5]},
    ]  # image 4 has none
    annotations, folder = _write(tmp_path, images, anns)
    (folder / "5.png").write_bytes(b"not a png")  # unreadable
    (folder / "6.png").unlink()  # missing
    problems = dict(read_split(annotations, folder).problems)
    assert problems == {
        str(folder / "1.png"): "annotation 10: bbox [60, 0, 10, 10] lies outside the 64x48 image",
        str(folder / "2.png"): "annotation 11: bbox [0, 0, 0, 5] has zero area",
        str(folder / "3.png"): "annotation 12: unknown category_id 3",
        str(folder / "4.png"): "no annotations",
        str(folder / "5.png"): "cannot decode: not an image format PIL recognises",
        str(folder / "6.png"): "missing image file",
    }
    assert read_split(annotations, folder).images == []


def test_a_file_that_is_not_coco_is_one_problem_naming_it(tmp_path):
    path = tmp_path / "instances_val.json"
    path.write_text('{"images": []}')
    split = read_split(path, tmp_path)
    assert split.images == [] and split.problems == [(str(path), "not a COCO instances file: 'categories'")]
