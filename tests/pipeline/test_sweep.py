"""The sweep stage against a real local Ray runtime: a killed trial, a stopped driver (twice), DDP trials.
A cluster of `ray start` nodes is in test_cluster.py."""

import csv
import json
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
import torch

from pipeline.config import load_config
from pipeline.sweep_results import best_trial
from tests.helpers import run_module, write_params

GRID = {"kernel_size": [3, 5], "stem": ["conv", "attention"]}


def _sweep_params(workdir, **sweep):
    overrides = {
        "models": {"variants": {"conv": {"form": "conv"}, "attn": {"form": "conv_stem_attention"}}},
        "sweep": {"name": "t", "base": "attn", "space": GRID, "train": {"epochs": 2}, **sweep},
    }
    write_params(workdir, overrides)


def _results(workdir):
    return list(csv.DictReader((workdir / "sweep" / "results.csv").open()))


def _trial_histories(workdir) -> dict[str, list[dict]]:
    """Tune's own per-trial record (result.json, one line per reported epoch) by trial id."""
    histories = {}
    for path in (workdir / "sweep" / "ray").glob("*/*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            histories[lines[0]["trial_id"]] = lines
    return histories


def _mlflow_runs(workdir):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("sasa.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sasa.kind") == "sweep_trial"]
    return parents, children


def _wait_for(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def _trial_workers(driver: subprocess.Popen):
    """The trial processes of this sweep: below its driver, which started the local Ray runtime (another
    sweep on the machine has trial processes of its own)."""
    return [
        p
        for p in psutil.Process(driver.pid).children(recursive=True)
        if any("ImplicitFunc" in part for part in p.cmdline() or [])
    ]


@pytest.mark.slow
def test_a_killed_trial_is_retried_from_its_last_checkpoint(workdir):
    """The trial trains as the train stage would, with its train section: here a weight EMA."""
    _sweep_params(
        workdir,
        space={"kernel_size": [3]},
        train={"epochs": 3, "limit_train_batches": 8, "ema_decay": 0.9},
        scheduler={"type": "fifo"},
        max_failures=2,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sweep"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: any(len(h) >= 1 for h in _trial_histories(workdir).values()), proc)
    (worker,) = _trial_workers(proc)
    worker.kill()  # the trial's process dies after its first epoch
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    ((trial_id, history),) = _trial_histories(workdir).items()
    assert len({h["pid"] for h in history}) == 2, "the trial was not run again in a new process"
    assert [h["epoch"] for h in history] == [1, 2, 3], "the retry did not continue from the checkpoint"
    (row,) = _results(workdir)
    assert row["trial_id"] == trial_id and row["epochs"] == "3"
    # top-1 is the last epoch's; the best epoch's is a column of its own
    assert float(row["top1"]) == pytest.approx(100 * history[-1]["val_top1"])
    assert float(row["best_epoch_top1"]) == pytest.approx(100 * max(h["val_top1"] for h in history))
    _, (child,) = _mlflow_runs(workdir)
    assert child.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(child.info.run_id, "val_top1")]
    assert sorted(steps) == [1, 2, 3]
    (checkpoint,) = (workdir / "sweep" / "ray").glob("*/*/checkpoint_*/last.ckpt")
    assert "averaging_state" in torch.load(checkpoint, map_location="cpu", weights_only=True), (
        "the trial trained without EMA"
    )


@pytest.mark.slow
def test_a_stopped_driver_marks_its_runs_killed_and_resumes_only_the_unfinished_trials(workdir):
    """SIGTERM (a scheduler's stop; Ctrl-C takes the same path). A SIGKILLed driver resumes the same
    way, from Tune's periodically saved experiment state, but leaves its runs RUNNING. The trials
    differ in their attention mixer: mixers are swept like any other architecture key."""
    mixers = ["sasa", "gnconv", "quadratic"]
    _sweep_params(workdir, space={"mixer": mixers}, scheduler={"type": "fifo"}, max_concurrent_trials=1)
    cmd = [sys.executable, "-m", "pipeline.sweep"]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(_trial_histories(workdir)) >= 2, proc)  # one trial at a time: the first is done
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert not (workdir / "sweep" / "results.csv").exists()
    done_before = {t: h for t, h in _trial_histories(workdir).items() if h[-1]["epoch"] == 2}
    assert 1 <= len(done_before) < 3
    assert proc.returncode == 130 and "interrupted with" in err, err[-3000:]
    (parent,), children = _mlflow_runs(workdir)
    assert parent.info.status == "KILLED"
    statuses = [c.info.status for c in children]
    assert statuses.count("FINISHED") == len(done_before) and set(statuses) == {"FINISHED", "KILLED"}

    # restored from Tune's state, then stopped again while a trial runs: its callback is the pickled one
    restored = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(c.info.status == "RUNNING" for c in _mlflow_runs(workdir)[1]), restored)
    restored.send_signal(signal.SIGTERM)
    out, err = restored.communicate(timeout=120)
    assert restored.returncode == 130 and "sweep: resuming" in out, err[-3000:]
    (parent,), children = _mlflow_runs(workdir)
    assert parent.info.status == "KILLED" and "RUNNING" not in {c.info.status for c in children}

    again = run_module("pipeline.sweep", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep: resuming" in again.stdout
    histories = _trial_histories(workdir)
    assert len(histories) == 3 and sorted(r["mixer"] for r in _results(workdir)) == sorted(mixers)
    for trial_id, history in done_before.items():
        assert histories[trial_id] == history, f"finished trial {trial_id} ran again"
    assert all(history[-1]["epoch"] == 2 for history in histories.values())
    (parent,), children = _mlflow_runs(workdir)
    assert parent.info.status == "FINISHED" and sorted(c.data.params["arch/mixer"] for c in children) == sorted(mixers)
    assert all(c.info.status == "FINISHED" for c in children)
    best = max(_results(workdir), key=lambda r: float(r["top1"]))  # sweep.metric: val_top1, mode: max
    assert parent.data.tags["sasa.best_trial_run"] == best["mlflow_run_id"]
    assert parent.data.metrics["best_trial_top1"] == pytest.approx(float(best["top1"]) / 100)


@pytest.mark.slow
def test_a_trial_can_be_a_ddp_job_of_ray_train_workers(workdir):
    _sweep_params(workdir, space={"kernel_size": [3]}, resources={"workers": 2, "cpu": 0.5}, max_concurrent_trials=1)
    proc = run_module("pipeline.sweep", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = _results(workdir)
    assert row["epochs"] == "2" and int(row["params"]) > 0
    # the trial drove a Ray Train run (TorchTrainer) that checkpointed under its trial id
    (train_run,) = (workdir / "sweep" / "ray").glob(f"*/train/{row['trial_id']}")
    assert list(train_run.glob("checkpoint_*/last.ckpt"))
    _, (child,) = _mlflow_runs(workdir)
    assert child.info.status == "FINISHED" and child.data.metrics["flops"] > 0


@pytest.mark.parametrize("metric,mode,best", [("val_top1", "max", "a"), ("val_loss", "min", "b")])
def test_the_best_trial_is_the_best_by_sweep_metric_and_mode(tmp_path, metric, mode, best):
    """The parent run's best trial (and the stage's summary) follow ``sweep.metric`` and ``sweep.mode``,
    as Tune's scheduler does: here the trial with the higher top-1 also has the higher loss."""
    write_params(tmp_path, {"sweep": {"metric": metric, "mode": mode}})
    rows = [{"trial_id": "a", "top1": 90.0, "val_loss": 0.5}, {"trial_id": "b", "top1": 80.0, "val_loss": 0.3}]
    assert best_trial(load_config(tmp_path / "params.yaml"), rows)["trial_id"] == best


@pytest.mark.slow
def test_a_sweep_over_training_length_feeds_the_reports_budget_section(workdir):
    """configs/budget.yaml in small: the variants train one epoch, the sweep trains each form for two; the
    report pairs each attention form with the conv of its length and plots the gap (its study once failed
    in this report stage, after the whole sweep)."""
    params = write_params(
        workdir,
        {
            "models": {"variants": {"conv": {"form": "conv"}, "attn": {"form": "conv_stem_attention"}}},
            "train": {"epochs": 1, "seeds": [0, 1]},
            "sweep": {
                "name": "t",
                "base": "conv",
                "space": {"form": ["conv", "conv_stem_attention"], "epochs": [2]},
                "train": {},
                "scheduler": {"type": "fifo"},
            },
        },
    )
    for variant in params["models"]["variants"]:
        proc = run_module("pipeline.train", "--variant", variant, cwd=workdir)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("pipeline.sweep", "pipeline.report"):
        proc = run_module(stage, cwd=workdir)
        assert proc.returncode == 0, proc.stderr[-3000:]

    report = (workdir / "reports" / "results.md").read_text()
    budget = report.split("## Training budget")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in budget.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [(r[0].strip("| "), r[2]) for r in rows] == [
        ("1", "conv"),
        ("1", "conv stem attention"),
        ("2", "conv"),
        ("2", "conv stem attention"),
    ]
    assert all("n = 2 pairs" in r[-1] for r in rows if r[2] != "conv"), budget
    assert (workdir / "reports" / "budget_gap_vs_epochs.png").stat().st_size > 10_000
