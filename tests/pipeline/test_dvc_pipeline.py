"""The whole pipeline through real DVC: repro, caching, per-variant re-runs, report from MLflow."""

import csv
import json
import sys
import time

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import REPO, run_in_project, write_params


def _sh(*cmd, cwd, check=True):
    proc = run_in_project(*cmd, cwd=cwd)
    if check:
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def project(dvc_project):
    variants = {
        "conv": {"form": "conv"},
        "attn": {"form": "full_attention"},
        "bot": {"form": "conv", "attention_groups": [4], "mixer": "bot"},
    }
    write_params(dvc_project, {"models": {"variants": variants}, "train": {"epochs": 1}})
    return dvc_project


@pytest.mark.slow
def test_repro_status_rerun_report_and_experiments(project):
    """One project through the whole DVC story (each part needs the full `dvc repro` before it, the
    suite's slowest step, so they share it): repro, status, a cached re-run, a per-variant re-run,
    then experiments compared against the committed results."""
    first = _sh("dvc", "repro", cwd=project)
    for stage in ("prepare", "train@conv", "train@attn", "train@bot", "sweep", "report"):
        assert f"Running stage '{stage}'" in first.stdout

    rows = list(csv.DictReader((project / "reports" / "results.csv").open()))
    # one row per configuration; the sweep's k = 3 trial trained the conv variant's network with its recipe
    assert sorted(r["configuration"] for r in rows) == ["attn", "bot", "conv, tiny kernel_size=3"]
    assert {r["configuration"]: r["kind"] for r in rows} == {
        "attn": "full_attention",
        "bot": "bot",
        "conv, tiny kernel_size=3": "conv",
    }
    md = (project / "reports" / "results.md").read_text()
    assert (
        "## Table 1: depth and form" in md and "| 4.7 / 13.7 / 74.5 |" in md and "| full attention | ResNet-26 |" in md
    )
    assert "| bot | resnet26 | conv | bot (4) |" in md and "| attn | resnet26 | attention | sasa (1, 2, 3, 4) |" in md
    assert "## Sweep trials" in md and "- *Table 4: spatial extent k*: no runs differ" in md
    for png in ("accuracy_vs_flops.png", "accuracy_vs_params.png", "sweep_accuracy_vs_flops.png"):
        assert Image.open(project / "reports" / png).size[0] > 300
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    reported = {run_id for r in rows for run_id in r["run_ids"].split()}
    assert (
        reported <= {r.info.run_id for r in runs if r.data.tags["sasa.kind"] in ("train", "sweep_trial")}
        and len(reported) == 3
    )
    (trial,) = list(csv.DictReader((project / "sweep" / "results.csv").open()))
    assert trial["mlflow_run_id"] in {r.info.run_id for r in runs if r.data.tags["sasa.kind"] == "sweep_trial"}
    _train_runs_and_trials_line_up(project, runs)

    shown = json.loads(_sh("dvc", "metrics", "show", "--json", cwd=project).stdout)
    table = (
        shown[0]["data"]["reports/metrics.json"]["data"]
        if isinstance(shown, list)
        else shown[""]["data"]["reports/metrics.json"]["data"]
    )
    assert set(table) == {"conv", "attn", "bot", "tiny kernel_size=3"} and {"top1", "n", "mflops"} <= set(table["attn"])
    written = json.loads((project / "reports" / "metrics.json").read_text())  # strict JSON: one seed has no interval
    assert written["attn"]["n"] == 1 and written["attn"]["top1_ci95"] is None and written["attn"]["mflops"] > 0
    assert table["attn"]["top1"] == pytest.approx(
        float({r["configuration"]: r for r in rows}["attn"]["top1"]), abs=1e-3
    )
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
    _experiments_carry_their_results_and_runs(project)


def _train_runs_and_trials_line_up(project, runs):
    """In the MLflow UI a variant's run and a sweep trial of the same network read alike: the same
    params, epochs as the step of every per-epoch metric, the same summary metrics, readable names,
    tags to filter by, the dataset as an input; the train run's model loads back and predicts."""
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs, not GenAI traces
    assert experiment.artifact_location.startswith((project / "mlruns").as_uri())
    by_name = {r.info.run_name: r for r in runs}
    variant, trial = by_name["conv seed 0"], by_name["tiny kernel_size=3 seed 0"]
    assert variant.data.tags["sasa.arch"] == trial.data.tags["sasa.arch"]  # the same network
    assert set(variant.data.params) == set(trial.data.params) and "arch/mixer_args" in variant.data.params
    assert {k: variant.data.params[k] for k in variant.data.params if k.startswith(("resolved/", "data/"))} == {
        k: trial.data.params[k] for k in trial.data.params if k.startswith(("resolved/", "data/"))
    }
    for run in (variant, trial):
        assert {"top1", "top5", "num_params", "macs", "flops", "val_top1", "val_loss"} <= set(
            run.data.metrics
        ) and "params" not in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1]  # epochs completed
        assert (
            run.data.tags["sasa.form"] == "conv"
            and run.data.tags["sasa.stem"] == "conv"
            and "sasa.k" not in run.data.tags
        )
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert sorted(i.tags[0].value for i in inputs) == ["train", "val"] and {i.dataset.name for i in inputs} == {
            "mnist5k-train",
            "mnist5k-val",
        }
    assert by_name["attn seed 0"].data.tags["sasa.k"] == "3" and by_name["bot seed 0"].data.tags["sasa.mixer"] == "bot"

    for run in (variant, by_name["attn seed 0"]):
        info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
        assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 28, 28)
        model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
        with torch.no_grad():
            assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.slow
def test_report_without_runs_fails_cleanly(project):
    proc = _sh(sys.executable, "-m", "pipeline.report", cwd=project, check=False)
    assert proc.returncode == 1 and "run the train stage first" in proc.stderr
    assert not (project / "reports").exists()


# Values the schema alone cannot judge (a model is built to find out), each in the project's own params.yaml
BAD_MODEL_VALUES = [
    (("models", "common", "kernel_size"), 4, "models.variants.conv: kernel_size must be odd"),
    (("models", "common", "heads"), 3, "models.variants.conv_stem_attention: out_channels=16 must be divisible by 3"),
    (("models", "common", "kernel_size"), -3, "models.variants.conv: kernel_size must be a positive integer"),
    (
        ("models", "variants", "full_attention", "form"),
        "attention_only",
        "models.variants.full_attention: form='attention_only' is not supported",
    ),
    (("sweep", "space", "stem"), ["conv", "patchify"], "sweep.space {'kernel_size': 5, 'stem': 'patchify'}: stem"),
]


@pytest.mark.slow
def test_a_bad_model_value_stops_dvc_repro_in_prepare_with_nothing_written(dvc_project):
    """prepare, the first stage, validates the whole file as train and sweep do: on an image folder it
    would otherwise decode every image before the train stage found the typo."""
    for path, value, needle in BAD_MODEL_VALUES:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        *parents, key = path
        section = params
        for name in parents:
            section = section[name]
        section[key] = value
        (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = _sh("dvc", "repro", cwd=dvc_project, check=False)
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "Running stage 'prepare'" in proc.stdout and "Running stage 'train" not in proc.stdout
        assert needle in proc.stderr, proc.stderr[-2000:]
        written = [d for d in ("data", "metrics", "reports", "sweep") if (dvc_project / d).exists()]
        assert not written, f"{path}={value!r} left {written}"


QUEUE_DEADLINE_S = 600


def _exp_metrics(project) -> dict:
    """Experiment name -> its reports/metrics.json, from `dvc exp show --json`."""
    shown = json.loads(_sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    found = {}
    for baseline in shown:
        for exp in [baseline, *[e for entry in baseline.get("experiments") or [] for e in entry["revs"]]]:
            data = (exp.get("data") or {}).get("metrics", {}).get("reports/metrics.json", {}).get("data")
            found[exp.get("name") or exp["rev"]] = data
    return found


def _experiments_carry_their_results_and_runs(project):
    """`dvc exp run --queue` + `dvc queue start` runs in a temporary copy of the project: its MLflow
    run still lands in the project's store, tagged with the experiment's name. A workspace `dvc exp
    run -S` re-runs only what the changed keys feed; run-time knobs re-run nothing. `dvc exp show`,
    `dvc exp diff`, `dvc metrics diff` and `dvc plots diff` then compare the experiments' results."""
    _sh(
        "git", "add", "-A", cwd=project
    )  # what the README says to commit: dvc.lock, metrics/, reports/, sweep/results.csv
    _sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline results", cwd=project)
    assert "reports/metrics.json" in _sh("git", "ls-files", cwd=project).stdout

    _sh("dvc", "exp", "run", "--queue", "-n", "bot-34", "-S", "models.variants.bot.attention_groups=[3,4]", cwd=project)
    _sh("dvc", "queue", "start", cwd=project)
    try:
        deadline = time.monotonic() + QUEUE_DEADLINE_S
        while "Success" not in (status := _sh("dvc", "queue", "status", cwd=project).stdout):
            assert "Failed" not in status, _sh("dvc", "queue", "logs", "bot-34", cwd=project, check=False).stdout[
                -5000:
            ]
            assert time.monotonic() < deadline, (
                f"the queued experiment did not finish in {QUEUE_DEADLINE_S} s:\n{status}"
            )
            time.sleep(3)
    finally:
        _sh("dvc", "queue", "stop", "--kill", cwd=project, check=False)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (queued,) = client.search_runs([client.get_experiment_by_name("test").experiment_id], "tags.`dvc.exp` = 'bot-34'")
    assert queued.data.tags["sasa.variant"] == "bot" and queued.info.status == "FINISHED"
    assert mlflow.pytorch.load_model(f"runs:/{queued.info.run_id}/model") is not None  # its artifacts outlived the copy

    run = _sh(
        "dvc",
        "exp",
        "run",
        "-n",
        "labels-off",
        "-S",
        "report.label_points=false",
        "-S",
        "data.num_workers=1",
        "-S",
        "train.progress_bar=false",
        cwd=project,
    )
    ran = sorted(line.split("'")[1] for line in run.stdout.splitlines() if line.startswith("Running stage"))
    assert ran == ["report"], run.stdout

    exps = _exp_metrics(project)
    bot34, labels_off = exps["bot-34"], exps["labels-off"]
    assert bot34["bot"]["mflops"] != labels_off["bot"]["mflops"] > 0 and bot34["conv"] == labels_off["conv"]
    diff = json.loads(_sh("dvc", "exp", "diff", "labels-off", "bot-34", "--json", cwd=project).stdout)
    assert "reports/metrics.json" in diff["metrics"] and "bot.mflops" in diff["metrics"]["reports/metrics.json"]
    metrics_diff = json.loads(_sh("dvc", "metrics", "diff", "HEAD", "bot-34", "--json", cwd=project).stdout)
    assert metrics_diff["reports/metrics.json"]["bot.mflops"]["diff"] != 0
    _sh("dvc", "plots", "diff", "HEAD", "bot-34", "-o", str(project.parent / "plots-diff"), cwd=project)
    assert (project.parent / "plots-diff" / "index.html").is_file()

    # run-time knobs re-run nothing; the tracking store re-runs only the report, which reads it
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["num_workers"], params["train"]["checkpoint_dir"] = 0, "elsewhere"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert "up to date" in _sh("dvc", "status", cwd=project).stdout
    params["mlflow"]["tracking_uri"] = "sqlite:///other.db"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    changed = json.loads(_sh("dvc", "status", "--json", cwd=project).stdout)
    assert set(changed) == {"report"}, changed
