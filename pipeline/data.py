"""Serving ``data/prepared`` to Lightning: datasets, augmentations, normalisation, workers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from pipeline import preflight
from pipeline.config import DataConfig

PREPARED = Path("data/prepared")


class ArrayDataset(Dataset):
    """uint8 NHWC arrays from an ``.npz`` split."""

    def __init__(self, path, transform):
        with np.load(path) as f:
            self.images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).contiguous()
            self.labels = torch.from_numpy(f["labels"]).long()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


class FileDataset(Dataset):
    """Images listed in a split index of (path relative to ``root``, label)."""

    def __init__(self, root, index_path, transform):
        self.root = Path(root)
        self.rows = json.loads(Path(index_path).read_text())
        self.transform = transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.rows[i]
        with Image.open(self.root / path) as img:
            return self.transform(img.convert("RGB")), label


class EpochSeededSampler(DistributedSampler):
    """The training order: a shuffle of (seed, epoch) like DDP's sampler (this one serves one process
    too), and at each epoch's first batch a reseed of the process's RNGs, which the augmentations draw
    from, by (seed, epoch, rank). Lightning calls ``set_epoch`` before every epoch, also the first one
    after a resume, so a resumed run sees exactly the batches the uninterrupted one saw."""

    def __iter__(self):
        epoch_seed = (self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank
        torch.manual_seed(epoch_seed)
        np.random.seed(epoch_seed % 2**32)
        random.seed(epoch_seed)
        yield from super().__iter__()


def transforms(meta, cfg: DataConfig, train: bool):
    """ImageNet-style random-resized crop for image folders; pad-crop for small array images."""
    res = cfg.resolution
    flip = [v2.RandomHorizontalFlip()] if cfg.hflip and train else []
    if meta["format"] == "files":
        geometry = (
            [v2.RandomResizedCrop(res, antialias=True)]
            if train
            else [v2.Resize(round(res * 256 / 224), antialias=True), v2.CenterCrop(res)]
        )
        head = [v2.ToImage()]
    else:
        geometry = [v2.Resize(res, antialias=True)] if tuple(meta.get("image_size", (res, res))) != (res, res) else []
        if train:
            geometry.append(v2.RandomCrop(res, padding=res // 8))
        head = []
    return v2.Compose(
        [*head, *geometry, *flip, v2.ToDtype(torch.float32, scale=True), v2.Normalize(meta["mean"], meta["std"])]
    )


class PreparedDataModule(pl.LightningDataModule):
    """``data/prepared`` of a classification source; ``pipeline.detection.DetectionDataModule``
    serves a detection source the same way (its datasets and batches its own)."""

    task = "classification"
    collate_fn = None  # DataLoader's default: tensors stacked

    def __init__(self, cfg: DataConfig, batch_size: int, prepared: str | Path = PREPARED, seed: int = 0):
        super().__init__()
        self.cfg, self.batch_size, self.prepared, self.seed = cfg, batch_size, Path(prepared), seed
        self.meta = preflight.prepared_data(self.prepared, batch_size, task=self.task)  # also on a trial's node

    @property
    def num_classes(self):
        return self.meta["num_classes"]

    @property
    def in_chans(self):
        return self.meta["in_chans"]

    def _dataset(self, split):
        transform = transforms(self.meta, self.cfg, train=split == "train")
        if self.meta["format"] == "files":
            return FileDataset(self.meta["root"], self.prepared / f"{split}.json", transform)
        return ArrayDataset(self.prepared / f"{split}.npz", transform)

    def setup(self, stage=None):
        self.train_set, self.val_set = self._dataset("train"), self._dataset("val")

    def _loader(self, dataset, **kwargs):
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=self.collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self):
        replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = EpochSeededSampler(self.train_set, replicas, rank, shuffle=True, seed=self.seed, drop_last=True)
        return self._loader(self.train_set, sampler=sampler, drop_last=True)

    def val_dataloader(self):
        return self._loader(self.val_set)
