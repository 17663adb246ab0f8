"""The prepare stage's detection sources: canvases of the bundled digits (deterministic, boxes inside
their canvases, no digit in both splits) and a COCO folder written here, whose bad annotations stop
the stage with every path listed or are skipped and listed; the data module serves both."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.detection import DetectionDataModule, read_canvases
from pipeline.prepare import prepare
from tests.helpers import write_params

CANVASES = {
    "source": "digit_canvases",
    "resolution": 48,
    "canvas": {"size": 48, "train": 24, "val": 8, "digits_per_canvas": [1, 3], "digit_sizes": [10, 24]},
}
DETECTOR = {"common": {"model": "retinanet_resnet26", "small_input": None}, "variants": {"conv": {"form": "conv"}}}
SWEEP = {"metric": "val_map", "base": "conv"}


def _params(folder, data):
    write_params(folder, {"data": data, "models": DETECTOR, "sweep": SWEEP, "train": {"batch_size": 4}})
    return load_config(folder / "params.yaml", builds=())


def test_digit_canvases_are_deterministic_with_boxes_inside_and_served_as_detection_batches(tmp_path):
    cfg = _params(tmp_path, CANVASES)
    meta = prepare(cfg, out=tmp_path / "a")
    prepare(cfg, out=tmp_path / "b")
    assert meta["task"] == "detection" and meta["counts"] == {"train": 24, "val": 8} and meta["in_chans"] == 1
    for split in ("train", "val"):
        a, b = read_canvases(tmp_path / "a" / f"{split}.npz"), read_canvases(tmp_path / "b" / f"{split}.npz")
        assert np.array_equal(a.images, b.images) and all(map(np.array_equal, a.boxes, b.boxes))
        boxes = np.concatenate(a.boxes)
        assert len(boxes) >= len(a.images) and (boxes >= 0).all() and (boxes <= 48).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        for image, canvas_boxes in zip(a.images, a.boxes):  # every box holds ink
            assert all(image[int(y1) : int(y2), int(x1) : int(x2)].max() > 0 for x1, y1, x2, y2 in canvas_boxes)
    data = DetectionDataModule(cfg.data, 4, tmp_path / "a", seed=0)
    data.setup()
    images, targets = next(iter(data.train_dataloader()))
    assert len(images) == 4 and images[0].shape == (1, 48, 48) and targets[0]["boxes"].dtype == torch.float32


def test_a_classifier_cannot_read_detection_data(tmp_path):
    from pipeline.data import PreparedDataModule

    cfg = _params(tmp_path, CANVASES)
    prepare(cfg, out=tmp_path / "p")
    with pytest.raises(ConfigError, match="holds detection data .* classification models are configured"):
        PreparedDataModule(cfg.data, 4, tmp_path / "p")


def _coco(root, split, boxes):
    """A COCO split of one image per box list in ``boxes`` (xywh), two categories with ids 3 and 9."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i, image_boxes in enumerate(boxes):
        Image.new("RGB", (40, 30), (i * 20, 90, 30)).save(root / split / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 40, "height": 30})
        annotations += [
            {"id": 100 * i + j, "image_id": i, "category_id": category, "bbox": box}
            for j, (category, box) in enumerate(image_boxes)
        ]
    categories = [{"id": 3, "name": "three"}, {"id": 9, "name": "nine"}]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


GOOD = [[(3, [1, 2, 10, 10])], [(9, [5, 5, 20, 20]), (3, [0, 0, 40, 30])], [(9, [30, 20, 10, 10])]]
BAD = [[(3, [35, 0, 10, 10])], [(9, [1, 1, 0, 4])], [(5, [1, 1, 4, 4])], []]  # outside, zero area, unknown, none


def _coco_params(tmp_path, on_bad_file):
    root = tmp_path / "coco"
    _coco(root, "tr", GOOD + BAD)
    _coco(root, "va", GOOD[:2])
    data = {"source": "coco", "path": str(root), "coco": {"train": "tr", "val": "va"}, "on_bad_file": on_bad_file}
    return root, _params(tmp_path, data)


def test_coco_bad_annotations_stop_prepare_with_every_path_and_nothing_written(tmp_path, capsys):
    root, cfg = _coco_params(tmp_path, "fail")
    with pytest.raises(ConfigError, match=r"4 bad file\(s\) in data.path"):
        prepare(cfg, out=tmp_path / "out")
    err = capsys.readouterr().err
    assert f"{root / 'tr' / '3.png'}: annotation 300: bbox [35, 0, 10, 10] lies outside the 40x30 image" in err
    assert f"{root / 'tr' / '4.png'}: annotation 400: bbox [1, 1, 0, 4] has zero area" in err
    assert f"{root / 'tr' / '5.png'}: annotation 500: unknown category_id 5" in err
    assert f"{root / 'tr' / '6.png'}: no annotations" in err
    assert not (tmp_path / "out").exists()


def test_coco_bad_annotations_are_skipped_listed_and_the_rest_served(tmp_path):
    root, cfg = _coco_params(tmp_path, "skip")
    out = tmp_path / "out"
    meta = prepare(cfg, out=out)
    assert meta["counts"] == {"train": 3, "val": 2} and meta["classes"] == ["three", "nine"] and meta["skipped"] == 4
    listed = {row["path"] for row in json.loads((out / "bad_files.json").read_text())}
    assert listed == {str(root / "tr" / f"{i}.png") for i in range(3, 7)}
    data = DetectionDataModule(cfg.data, 2, out)
    data.setup()
    image, target = data.val_set[1]
    assert image.shape == (3, 30, 40) and target["labels"].tolist() == [1, 0]
    assert target["boxes"].tolist() == [[5, 5, 25, 25], [0, 0, 40, 30]]


def test_a_folder_without_the_configured_split_names_what_it_needs(tmp_path):
    root, cfg = _coco_params(tmp_path, "fail")
    (root / "annotations" / "instances_va.json").unlink()
    with pytest.raises(ConfigError, match="not a COCO folder for data.coco.val='va': needs annotations/instances_va"):
        prepare(cfg, out=tmp_path / "out")
