"""Detection end to end through real DVC, as a user runs the Table 2 preset: prepare the digit
canvases, train an all-conv and an all-attention RetinaNet over two seeds, a Ray Tune sweep of the
attention detector's k, and the report's Table 2 read back from MLflow."""

import csv
import json

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import run_in_project, write_params

DETECTION = {
    "data": {
        "source": "digit_canvases",
        "resolution": 48,
        "canvas": {"size": 48, "train": 32, "val": 8, "digits_per_canvas": [1, 2], "digit_sizes": [12, 24]},
    },
    "models": {
        "common": {"model": "retinanet_resnet26", "small_input": None, "fpn_channels": 16},
        "variants": {
            "conv": {"form": "conv", "head_mixer": "conv"},
            "attention": {"form": "full_attention", "head_mixer": "sasa"},
        },
    },
    "train": {"epochs": 1, "batch_size": 8, "seeds": [0, 1], "optimizer": "adamw", "lr": 0.001, "warmup_epochs": 0},
    "sweep": {"name": "det_k", "base": "attention", "space": {"kernel_size": [5]}, "metric": "val_map"},
}


@pytest.mark.slow
def test_dvc_repro_trains_detectors_and_reports_table2(dvc_project):
    write_params(dvc_project, DETECTION)
    proc = run_in_project("dvc", "repro", cwd=dvc_project)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for stage in ("prepare", "train@conv", "train@attention", "sweep", "report"):
        assert f"Running stage '{stage}'" in proc.stdout

    summary = json.loads((dvc_project / "metrics" / "attention.json").read_text())
    assert summary["n"] == 2 and 0 <= summary["map"] <= 1 and set(summary["seeds"]["0"]) >= {"map", "map_50"}
    md = (dvc_project / "reports" / "results.md").read_text()
    assert "## Table 2: detection (RetinaNet, FPN + heads x backbone)" in md
    assert "| conv | conv |" in md and "| baseline | 1.00x / 1.00x |" in md
    assert "| full attention | sasa |" in md and "(abstract: 0.61x / 0.66x) |" in md and "(n=2)" in md
    assert "mAP@50 %" in md and "## Sweep trials" in md
    rows = {r["configuration"]: r for r in csv.DictReader((dvc_project / "reports" / "results.csv").open())}
    assert set(rows) == {"conv", "attention", "det_k kernel_size=5"} and all(r["map"] != "" for r in rows.values())
    assert set(json.loads((dvc_project / "reports" / "metrics.json").read_text())["conv"]) == {
        "map", "map_ci95", "n", "mflops",
    }  # fmt: skip
    assert Image.open(dvc_project / "reports" / "detection_map_vs_flops.png").size[0] > 300

    # each seed's run carries the task, every mAP column at each epoch, the dataset, and a loadable detector
    mlflow.set_tracking_uri(f"sqlite:///{dvc_project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["test"], filter_string="tags.`sasa.variant` = 'attention'")
    assert len(runs) == 2 and set(runs["tags.sasa.task"]) == {"detection"}
    assert {"metrics.val_map", "metrics.val_map_50", "metrics.map", "metrics.flops"} <= set(runs.columns)
    detector = mlflow.pytorch.load_model(f"runs:/{runs['run_id'][0]}/model").eval()
    with torch.no_grad():
        (found,) = detector([torch.rand(1, 48, 48)])
    assert set(found) == {"boxes", "scores", "labels"}
    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    assert params["data"]["canvas"]["size"] == 48
