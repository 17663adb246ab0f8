"""Training a detector with Lightning: the LightningModule over a registered detection model
(``sasa.create_model("retinanet_resnet50", ...)``) and the data module of the digit canvases.

The detector computes its own losses (focal classification, L1 box regression) from images and
targets in training; in validation it returns detections, scored by COCO mAP at the epoch's end
(``pipeline.detection_metrics``). Optimizer and schedule are the classifiers' (``TrainedModule``).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

import sasa
from pipeline.config import TrainConfig
from pipeline.detection_metrics import map_metric, summary
from pipeline.digit_canvases import Canvases
from pipeline.module import TrainedModule
from sasa.models.registry import check_model


class Detector(TrainedModule):
    def __init__(self, model: str, model_args: dict, num_classes: int, in_chans: int, train: dict):
        super().__init__()
        check_model(model, task="detection")
        self.save_hyperparameters(logger=False)
        self.train_cfg = TrainConfig(**train)
        self.model = sasa.create_model(model, num_classes=num_classes, in_chans=in_chans, **model_args)
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
        result = summary(self.val_map.compute())
        self.val_map.reset()
        # no object of a size class: logged as -1, as COCO reports it (metrics cannot hold NaN in every store)
        self.log_dict({f"val_{k}": -1.0 if math.isnan(v) else v for k, v in result.items()}, prog_bar=False)


class CanvasDataset(Dataset):
    """Canvases as a detector reads them: a float image in [0, 1] (1 channel) and its boxes and labels."""

    def __init__(self, canvases: Canvases):
        self.canvases = canvases

    def __len__(self):
        return len(self.canvases.images)

    def __getitem__(self, i):
        image = torch.from_numpy(self.canvases.images[i]).float().div(255).unsqueeze(0)
        target = {
            "boxes": torch.from_numpy(self.canvases.boxes[i]),
            "labels": torch.from_numpy(self.canvases.labels[i]),
        }
        return image, target


def collate(batch):
    """Detection batches are lists: images may differ in size and hold different numbers of boxes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class CanvasDataModule(pl.LightningDataModule):
    def __init__(self, train: Canvases, val: Canvases, batch_size: int, seed: int = 0):
        super().__init__()
        self.train_set, self.val_set = CanvasDataset(train), CanvasDataset(val)
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self):
        shuffle = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, collate_fn=collate, generator=shuffle)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, collate_fn=collate)
