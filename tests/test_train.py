"""The train stage through the real Lightning Trainer and a real SQLite MLflow store."""
import json
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from tests.conftest import TINY, run_module, write_params

pytestmark = pytest.mark.slow


def _runs(workdir, experiment="test"):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_train_tracks_every_metric_param_tag_and_the_best_checkpoint(workdir):
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"], cwd=workdir, check=True)
    proc = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "metrics" / "conv.json").read_text())
    (run,) = _runs(workdir)
    assert run.info.status == "FINISHED" and run.info.run_id == summary["run_id"]
    metrics = run.data.metrics
    for name in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "train_images_per_s",
                 "top1", "top5", "params", "macs", "flops", "throughput_images_per_s"):
        assert name in metrics, name
    assert metrics["flops"] == 2 * metrics["macs"] == summary["flops"] > 0
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    params = run.data.params
    assert params["arch/form"] == "conv" and params["train/epochs"] == "2" and params["data/source"] == "mnist5k"
    tags = run.data.tags
    assert tags["dvc.stage"] == "train@conv" and len(tags["mlflow.source.git.commit"]) == 40
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_top1")
    assert len(history) == 2  # one value per epoch
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.ckpt"]


def test_ddp_two_cpu_processes(workdir):
    write_params(workdir, {"train": {"devices": 2, "strategy": "ddp", "epochs": 1}})
    proc = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # Lightning's line for the second of two ranks
    (run,) = _runs(workdir)  # one run, created by rank 0 only
    assert run.info.status == "FINISHED" and "val_top1" in run.data.metrics


def test_killed_training_resumes_in_the_same_run_without_repeating_epochs(workdir):
    write_params(workdir, {"train": {"epochs": 3, "limit_train_batches": 12}})
    cmd = [sys.executable, "-m", "pipeline.train", "--variant", "conv"]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = workdir / "checkpoints" / "conv" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (workdir / "metrics" / "conv.json").exists(), "killed too late to test a resume"
    (killed,) = _runs(workdir)
    assert killed.info.status == "RUNNING"

    again = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restoring states from the checkpoint" in again.stdout + again.stderr
    (run,) = _runs(workdir)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    client = mlflow.MlflowClient()
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch")]
    val = client.get_metric_history(run.info.run_id, "val_top1")
    assert len(val) == 3 and len({m.step for m in val}) == 3
    assert sorted(set(epochs)) == [0, 1, 2]


def test_changed_configuration_starts_a_new_run(workdir):
    assert run_module("pipeline.train", "--variant", "conv", cwd=workdir).returncode == 0
    write_params(workdir, {"train": {"lr": 0.05}})
    assert run_module("pipeline.train", "--variant", "conv", cwd=workdir).returncode == 0
    runs = _runs(workdir)
    assert len(runs) == 2 and {r.data.params["train/lr"] for r in runs} == {"0.1", "0.05"}


def test_rerun_after_a_finished_run_trains_afresh(workdir):
    """DVC re-runs a stage after a code change with the same params: it must not re-report the old
    checkpoint as a new result."""
    assert run_module("pipeline.train", "--variant", "conv", cwd=workdir).returncode == 0
    again = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restoring states" not in again.stdout + again.stderr
    runs = _runs(workdir)
    assert len(runs) == 2 and all(len(mlflow.MlflowClient().get_metric_history(r.info.run_id, "val_top1")) == 2 for r in runs)


def test_interrupted_run_missing_from_the_store_starts_a_new_run(workdir):
    assert run_module("pipeline.train", "--variant", "conv", cwd=workdir).returncode == 0
    state_file = workdir / "checkpoints" / "conv" / "run.json"
    state = json.loads(state_file.read_text())
    state.pop("finished")  # as if killed before the end
    state_file.write_text(json.dumps(state))
    (workdir / "mlflow.db").unlink()
    again = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    (run,) = _runs(workdir)
    assert run.info.run_id != state["run_id"] and run.info.status == "FINISHED"


def test_batch_larger_than_the_training_set_is_a_clear_error(workdir):
    write_params(workdir, {"train": {"batch_size": 5000}})
    proc = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert proc.returncode == 1 and "train.batch_size=5000 exceeds the 4000 training images" in proc.stderr
    assert "Traceback" not in proc.stderr and not (workdir / "metrics").exists()


def test_unknown_variant_exits_2(workdir):
    proc = run_module("pipeline.train", "--variant", "nope", cwd=workdir)
    assert proc.returncode == 2 and "models.variants" in proc.stderr and not (workdir / "checkpoints").exists()


@pytest.mark.slow
def test_compile_option_runs_the_attention_model_compiled():
    """train.compile: torch.compile traces through the local-attention custom op (its fake
    implementations must match the real kernels' shapes and strides, forward and backward), the
    compiled model computes what the eager one does, and checkpoints keep their keys."""
    from pipeline.module import Classifier

    arch = {**TINY["models"]["common"], "form": "full_attention"}
    # float64 and eval-mode batch norm: a random 26-layer net amplifies float32 reordering noise
    module = Classifier(arch, num_classes=10, in_chans=1, train={**TINY["train"], "compile": True}).double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    eager_grads = torch.autograd.grad(module.model(x).square().sum(), list(module.model.parameters()))
    out = module(x)
    compiled_grads = torch.autograd.grad(out.square().sum(), list(module.model.parameters()))
    torch.testing.assert_close(out, module.model(x))
    for g, g_eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, g_eager)
    model_keys = {f"model.{key}" for key in module.model.state_dict()}
    assert set(module.state_dict()) == model_keys
    eager = Classifier(arch, num_classes=10, in_chans=1, train=TINY["train"])
    assert set(eager.state_dict()) == model_keys
