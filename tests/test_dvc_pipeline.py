"""The whole pipeline through real DVC: repro, caching, per-variant re-runs, report from MLflow."""
import csv
import sys
import time

import mlflow
import pytest
import yaml
from PIL import Image

from tests.conftest import run_in_project, write_params

pytestmark = pytest.mark.slow


def _sh(*cmd, cwd, check=True):
    proc = run_in_project(*cmd, cwd=cwd)
    if check:
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def project(dvc_project):
    variants = {"conv": {"form": "conv"}, "attn": {"form": "full_attention"}, "bot": {"form": "conv", "attention_groups": [4], "mixer": "bot"}}
    write_params(dvc_project, {"models": {"variants": variants}, "train": {"epochs": 1}})
    return dvc_project


def test_repro_status_rerun_and_report(project):
    first = _sh("dvc", "repro", cwd=project)
    for stage in ("prepare", "train@conv", "train@attn", "train@bot", "sweep", "report"):
        assert f"Running stage '{stage}'" in first.stdout

    rows = list(csv.DictReader((project / "reports" / "results.csv").open()))
    # one row per configuration; the sweep's k = 3 trial trained the conv variant's network with its recipe
    assert sorted(r["configuration"] for r in rows) == ["attn", "bot", "conv, sweep tiny"]
    assert {r["configuration"]: r["kind"] for r in rows} == {"attn": "full_attention", "bot": "bot", "conv, sweep tiny": "conv"}
    md = (project / "reports" / "results.md").read_text()
    assert "## Table 1: depth and form" in md and "| 4.7 / 13.7 / 74.5 |" in md and "| full attention | ResNet-26 |" in md
    assert "| bot | resnet26 | conv | bot (4) |" in md and "| attn | resnet26 | attention | sasa (1, 2, 3, 4) |" in md
    assert "## Sweep trials" in md and "- *Table 4: spatial extent k*: no runs differ" in md
    for png in ("accuracy_vs_flops.png", "accuracy_vs_params.png", "sweep_accuracy_vs_flops.png"):
        assert Image.open(project / "reports" / png).size[0] > 300
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    reported = {run_id for r in rows for run_id in r["run_ids"].split()}
    assert reported <= {r.info.run_id for r in runs if r.data.tags["sasa.kind"] in ("train", "sweep_trial")} and len(reported) == 3
    (trial,) = list(csv.DictReader((project / "sweep" / "results.csv").open()))
    assert trial["mlflow_run_id"] in {r.info.run_id for r in runs if r.data.tags["sasa.kind"] == "sweep_trial"}

    assert "conv.json" in _sh("dvc", "metrics", "show", cwd=project).stdout
    _sh("dvc", "plots", "show", "-o", str(project / "plots_html"), cwd=project)
    assert "up to date" in _sh("dvc", "status", cwd=project).stdout

    start = time.perf_counter()
    second = _sh("dvc", "repro", cwd=project)
    assert time.perf_counter() - start < 15
    assert "Running stage" not in second.stdout

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["models"]["variants"]["attn"]["kernel_size"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    third = _sh("dvc", "repro", cwd=project)
    ran = sorted(line.split("'")[1] for line in third.stdout.splitlines() if line.startswith("Running stage"))
    assert ran == ["report", "train@attn"]


def test_report_without_runs_fails_cleanly(project):
    proc = _sh(sys.executable, "-m", "pipeline.report", cwd=project, check=False)
    assert proc.returncode == 1 and "run the train stage first" in proc.stderr
    assert not (project / "reports").exists()
