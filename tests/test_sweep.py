"""The sweep stage against real Ray runtimes: a two-node local cluster, a killed trial, a killed driver."""
import csv
import json
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
from ray.cluster_utils import Cluster

from tests.conftest import run_module, write_params

pytestmark = pytest.mark.slow

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


@pytest.fixture
def cluster():
    """Two real Ray nodes with one CPU each, on this machine."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_sweep_on_a_two_node_cluster_spreads_trials_and_nests_mlflow_runs(workdir, cluster):
    _sweep_params(workdir)
    proc = run_module("pipeline.sweep", cwd=workdir, env={"RAY_ADDRESS": cluster.address})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 node(s)" in proc.stdout

    rows = _results(workdir)
    assert sorted((int(r["kernel_size"]), r["stem"]) for r in rows) == [(3, "attention"), (3, "conv"), (5, "attention"), (5, "conv")]
    assert len({r["node_id"] for r in rows}) == 2, "every trial ran on the same node"
    for r in rows:
        assert int(r["params"]) > 0 and float(r["mflops"]) > 0 and 0 <= float(r["best_top1"]) <= 100
        assert 1 <= int(r["epochs"]) <= 2
    # attention stems and larger windows cost more FLOPs; params do not depend on k
    by = {(int(r["kernel_size"]), r["stem"]): r for r in rows}
    assert float(by[5, "conv"]["mflops"]) > float(by[3, "conv"]["mflops"])
    assert int(by[5, "conv"]["params"]) - int(by[3, "conv"]["params"]) < 0.01 * int(by[3, "conv"]["params"])

    (parent,), children = _mlflow_runs(workdir)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep/base"] == "attn"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.run_id for c in children} == {r["mlflow_run_id"] for r in rows}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.metrics["flops"] > 0 and child.data.metrics["params"] > 0 and "val_top1" in child.data.metrics
        assert child.data.params["arch/stem"] in ("conv", "attention") and child.data.params["train/epochs"] == "2"


def _trial_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if any("ImplicitFunc" in part for part in p.info["cmdline"] or [])]


def test_a_killed_trial_is_retried_from_its_last_checkpoint(workdir):
    _sweep_params(workdir, space={"kernel_size": [3]}, train={"epochs": 3, "limit_train_batches": 8},
                  scheduler={"type": "fifo"}, max_failures=2)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(len(h) >= 1 for h in _trial_histories(workdir).values()), proc)
    (worker,) = _trial_workers()
    worker.kill()  # the trial's process dies after its first epoch
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    ((trial_id, history),) = _trial_histories(workdir).items()
    assert len({h["pid"] for h in history}) == 2, "the trial was not run again in a new process"
    assert [h["epoch"] for h in history] == [1, 2, 3], "the retry did not continue from the checkpoint"
    (row,) = _results(workdir)
    assert row["trial_id"] == trial_id and row["epochs"] == "3"
    _, (child,) = _mlflow_runs(workdir)
    assert child.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(child.info.run_id, "val_top1")]
    assert sorted(steps) == [1, 2, 3]


def test_a_stopped_driver_marks_its_runs_killed_and_resumes_only_the_unfinished_trials(workdir):
    """SIGTERM (a scheduler's stop; Ctrl-C takes the same path). A SIGKILLed driver resumes the same
    way, from Tune's periodically saved experiment state, but leaves its runs RUNNING. The trials
    differ in their attention mixer: mixers are swept like any other architecture key."""
    mixers = ["sasa", "neighborhood", "san_pairwise"]
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
