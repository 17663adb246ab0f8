"""Training a detector with Lightning: the LightningModule over a registered detection model
(``models.variants.NAME.model: retinanet_resnet50``) and the data module serving a prepared
detection set (``data.source: digit_canvases | coco``), used by the train stage and sweep trials
through ``pipeline.module.build_run`` as the classifiers are.

The detector computes its own losses (focal classification, L1 box regression) from images and
targets in training; in validation it returns detections, scored by COCO mAP at the epoch's end
(``pipeline.detection_metrics``). Optimizer and schedule are the classifiers' (``TrainedModule``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.arch_config import ArchConfig
from pipeline.config import TrainConfig
from pipeline.data import PreparedDataModule
from pipeline.detection_metrics import map_metric, summary
from pipeline.digit_canvases import Canvases
from pipeline.module import TrainedModule


class Detector(TrainedModule):
    def __init__(self, arch: dict, num_classes: int, in_chans: int, train: dict, resolution: int, mean, std):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.train_cfg = TrainConfig(**train)
        arch = ArchConfig(**arch)
        if arch.task != "detection":
            raise ValueError(f"model={arch.model_name!r} is a {arch.task} model; a Detector trains detection models")
        self.model = arch.build(num_classes, in_chans, resolution, image_mean=mean, image_std=std)
        self.configure_norms(self.model)
        self.val_map = map_metric()

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        batch_size = len(images)
        self.log_dict({f"train_{k}": v for k, v in losses.items()}, on_epoch=True, batch_size=batch_size)
        self.log("train_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        self.val_map.update(self.model(images), targets)

    def on_validation_epoch_end(self):
        result = summary(self.val_map.compute())  # over every rank's images
        self.val_map.reset()
        # no object of a size class: logged as -1, as COCO reports it (metrics cannot hold NaN in every store)
        self.log_dict({f"val_{k}": -1.0 if math.isnan(v) else v for k, v in result.items()}, prog_bar=False)


class CanvasDataset(Dataset):
    """Canvases as a detector reads them: a float image in [0, 1] (1 channel) and its boxes and labels."""

    def __init__(self, canvases: Canvases, hflip: bool = False):
        self.canvases, self.hflip = canvases, hflip

    def __len__(self):
        return len(self.canvases.images)

    def __getitem__(self, i):
        image = torch.from_numpy(self.canvases.images[i]).float().div(255).unsqueeze(0)
        return flip_maybe(image, self.canvases.boxes[i], self.canvases.labels[i], self.hflip)


class FileDataset(Dataset):
    """A COCO index's images (``[path under root, boxes, labels]``) as RGB floats in [0, 1]."""

    def __init__(self, root, index_path, hflip: bool = False):
        self.root, self.rows, self.hflip = Path(root), json.loads(Path(index_path).read_text()), hflip

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from PIL import Image

        path, boxes, labels = self.rows[i]
        with Image.open(self.root / path) as img:
            image = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float().div(255)
        boxes, labels = np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)
        return flip_maybe(image, boxes, labels, self.hflip)


def flip_maybe(image: torch.Tensor, boxes: np.ndarray, labels: np.ndarray, hflip: bool):
    """(image, target); with ``hflip``, mirrored left-right with its boxes half of the time (the
    process's RNG, which ``EpochSeededSampler`` seeds by seed and epoch)."""
    boxes = torch.from_numpy(boxes).clone()
    if hflip and torch.rand(()) < 0.5:
        image = image.flip(-1)
        boxes[:, [0, 2]] = image.shape[-1] - boxes[:, [2, 0]]
    return image, {"boxes": boxes, "labels": torch.from_numpy(labels)}


def read_canvases(path: Path) -> Canvases:
    """A prepared ``.npz`` of canvases: boxes and labels stored flat, split by each canvas's count."""
    with np.load(path) as f:
        splits = np.cumsum(f["per_image"])[:-1]
        return Canvases(f["images"][..., 0], np.split(f["boxes"], splits), np.split(f["labels"], splits))


def collate(batch):
    """Detection batches are lists: images may differ in size and hold different numbers of boxes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class DetectionDataModule(PreparedDataModule):
    """``data/prepared`` of a detection source; each epoch's order and flips seeded as the classifiers'."""

    task = "detection"
    collate_fn = staticmethod(collate)

    def _dataset(self, split):
        hflip = self.cfg.hflip and split == "train"
        if self.meta["format"] == "files":
            return FileDataset(self.meta["root"], self.prepared / f"{split}.json", hflip)
        return CanvasDataset(read_canvases(self.prepared / f"{split}.npz"), hflip)
