"""The train stage through the real Lightning Trainer and a real SQLite MLflow store."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import lightning.pytorch as pl
import mlflow
import mlflow.pytorch
import pytest
import torch

import sasa
from pipeline.checkpoints import AtomicCheckpointIO
from tests.helpers import TINY, run_module, stage_log, write_params


def _runs(workdir, experiment="test"):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.mark.slow
def test_train_tracks_every_metric_param_tag_and_the_best_checkpoint(workdir):
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
        cwd=workdir,
        check=True,
    )
    proc = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "metrics" / "conv.json").read_text())
    (run,) = _runs(workdir)
    assert run.info.status == "FINISHED" and run.info.run_id == summary["seeds"]["0"]["run_id"]
    metrics = run.data.metrics
    for name in (
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "val_top5",
        "train_images_per_s",
        "top1",
        "top5",
        "num_params",
        "macs",
        "flops",
        "throughput_images_per_s",
    ):
        assert name in metrics, name
    assert (
        metrics["flops"] == 2 * metrics["macs"] == summary["flops"] > 0 and metrics["num_params"] == summary["params"]
    )
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    params = run.data.params
    assert params["arch/form"] == "conv" and params["train/epochs"] == "2" and params["data/source"] == "mnist5k"
    tags = run.data.tags
    assert tags["dvc.stage"] == "train@conv" and len(tags["mlflow.source.git.commit"]) == 40
    assert run.info.run_name == "conv seed 0" and params["train/seed"] == "0" and "epoch" not in metrics
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2]  # one value per epoch, stepped by epochs completed
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.ckpt"]
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")  # the final weights: they give the final top-1
    ckpt = torch.load(workdir / "checkpoints" / "conv" / "seed-0" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1, "last.ckpt is not the last epoch's: a resume would repeat epochs"
    assert all(torch.equal(v, ckpt["state_dict"][f"model.{k}"]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_ddp_two_cpu_processes(workdir):
    write_params(workdir, {"train": {"devices": 2, "strategy": "ddp", "epochs": 1}})
    proc = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in stage_log(workdir, "train@conv")  # Lightning's line for the second of two ranks
    (run,) = _runs(workdir)  # one run, created by rank 0 only
    assert run.info.status == "FINISHED" and "val_top1" in run.data.metrics


def _final_state(folder):
    """Weights, optimizer state and every per-epoch metric of the variant's finished run."""
    ckpt = torch.load(folder / "checkpoints" / "conv" / "seed-0" / "last.ckpt", map_location="cpu", weights_only=True)
    (run,) = [r for r in _runs(folder) if r.info.status == "FINISHED"]
    client = mlflow.MlflowClient()
    # A kill after an epoch's metrics reached MLflow but before its checkpoint did makes the resumed
    # run log that epoch again: the same (step, value), which a set counts once.
    history = {
        k: sorted({(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)})
        for k in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5")
    }
    return ckpt, run, history


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_rerun_ends_bit_identical_to_an_uninterrupted_run(workdir, tmp_path_factory):
    params = {"train": {"epochs": 3, "limit_train_batches": 12, "limit_val_batches": 4}}
    write_params(workdir, params)
    reference = tmp_path_factory.mktemp("uninterrupted")
    shutil.copytree(workdir, reference, dirs_exist_ok=True)
    done = run_module("pipeline.train", "--variant", "conv", cwd=reference)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--variant", "conv"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = workdir / "checkpoints" / "conv" / "seed-0" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    delay = random.uniform(0, 2.0)  # somewhere in the second epoch (one takes ~3 s here)
    print(f"SIGKILL {delay:.2f} s after the first checkpoint")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (workdir / "metrics" / "conv.json").exists(), "killed too late to test a resume"
    (killed,) = _runs(workdir)
    assert killed.info.status == "RUNNING"  # SIGKILL leaves no chance to say otherwise; the re-run takes it over

    shutil.rmtree(workdir / "logs")  # the re-run's log alone
    again = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restoring states from the checkpoint" in stage_log(workdir, "train@conv")
    ckpt, run, history = _final_state(workdir)
    ref_ckpt, _, ref_history = _final_state(reference)
    assert run.info.run_id == killed.info.run_id
    assert len(history["val_top1"]) == len({step for step, _ in history["val_top1"]}) == 3  # no epoch with two values
    assert history == ref_history
    assert ckpt["state_dict"].keys() == ref_ckpt["state_dict"].keys()
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(value, ref_ckpt["state_dict"][key]), key
    for state, ref_state in zip(
        ckpt["optimizer_states"][0]["state"].values(), ref_ckpt["optimizer_states"][0]["state"].values()
    ):
        assert all(torch.equal(state[k], ref_state[k]) for k in state)
    summary, ref_summary = (json.loads((f / "metrics" / "conv.json").read_text()) for f in (workdir, reference))
    assert (summary["top1"], summary["top5"]) == (ref_summary["top1"], ref_summary["top5"])


def _sigterm_once_written(workdir, path):
    """Start the train stage, SIGTERM it as soon as ``path`` exists; the process and its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--variant", "conv"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc, err


@pytest.mark.slow
def test_sigterm_marks_the_run_killed_and_the_rerun_finishes_it(workdir):
    write_params(workdir, {"train": {"epochs": 3, "limit_train_batches": 12}})
    proc, err = _sigterm_once_written(workdir, workdir / "checkpoints" / "conv" / "seed-0" / "last.ckpt")
    assert proc.returncode == 130 and "interrupted" in err, err[-3000:]
    (killed,) = _runs(workdir)
    assert killed.info.status == "KILLED"
    assert not list((workdir / "checkpoints" / "conv" / "seed-0").glob("*.tmp"))
    again = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    (run,) = _runs(workdir)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"


class _NanAtSecondEpoch(pl.Callback):
    """The fault: the loss of the third batch of epoch 1 becomes NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            batch[0][0, 0, 0, 0] = float("nan")


def test_a_nan_loss_stops_training_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(
    workdir, monkeypatch, capsys
):
    from pipeline import module, train

    write_params(workdir, {"train": {"epochs": 3}})
    real_build = module.build_trainer
    monkeypatch.setattr(
        train,
        "build_trainer",
        lambda cfg, **kw: real_build(cfg, **{**kw, "callbacks": [*kw["callbacks"], _NanAtSecondEpoch()]}),
    )
    last = workdir / "checkpoints" / "conv" / "seed-0" / "last.ckpt"
    saved = {}
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", _recording(AtomicCheckpointIO.save_checkpoint, saved))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--variant", "conv"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "the training loss is nan at epoch 1 (counting from 0), batch 2 of the epoch, global step 6" in err
    assert f"{last.relative_to(workdir)} (end of epoch 0), is intact" in err
    assert "Traceback" not in err and not (workdir / "metrics").exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 4 and saved["last"] == last.read_bytes()
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    (run,) = _runs(workdir)
    assert run.info.status == "FAILED"


def _recording(save, saved):
    """Wrap the checkpoint writer to keep the bytes of the last ``last.ckpt`` it wrote."""

    def wrapper(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if str(path).endswith("last.ckpt"):
            saved["last"] = Path(path).read_bytes()

    return wrapper


def test_a_checkpoint_write_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, request):
    """With the system temp folder on another filesystem than the checkpoints (a node's own /tmp,
    checkpoints on shared storage), Lightning's own save ends in a copy into ``last.ckpt``, and a kill
    during that copy left a truncated checkpoint to resume from."""
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than pytest's temporary folders")
    elsewhere = tempfile.mkdtemp(dir=other)
    request.addfinalizer(lambda: shutil.rmtree(elsewhere))
    monkeypatch.setattr(tempfile, "tempdir", elsewhere)
    io, last = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0}, last)

    def killed(source, target, *args):  # the copy, cut short
        target.write(source.read(64))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfileobj", killed)
    monkeypatch.setattr(shutil, "_fastcopy_sendfile", killed)
    try:
        io.save_checkpoint({"epoch": 1}, last)
    except KeyboardInterrupt:
        pass
    assert torch.load(last, weights_only=True)["epoch"] in (0, 1)

    def killed_writing(obj, f, *args, **kwargs):  # the checkpoint's own write, cut short
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_writing)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, last)
    assert torch.load(last, weights_only=True)["epoch"] in (0, 1) and os.listdir(tmp_path) == ["last.ckpt"]


def test_checkpoints_behind_an_fsspec_url(workdir):
    """train.checkpoint_dir may be a URL (s3://, gs://, ...): here fsspec's in-memory filesystem,
    within one process."""
    from pipeline.config import load_config
    from pipeline.train import train

    # absolute: MLflow caches a store per URI, and an earlier test in this process used sqlite:///mlflow.db
    write_params(
        workdir,
        {"train": {"checkpoint_dir": "memory://ckpts"}, "mlflow": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db"}},
    )
    fs = fsspec.filesystem("memory")
    summary = train(load_config("params.yaml"), "conv")
    assert fs.exists("/ckpts/conv/seed-0/last.ckpt") and fs.exists("/ckpts/conv/seed-0/best.ckpt")
    record = json.loads(fs.cat_file("/ckpts/conv/seed-0/run.json"))
    assert record["run_id"] == summary["seeds"]["0"]["run_id"] and record["finished"] is True
    assert not (workdir / "checkpoints").exists()
    (run,) = _runs(workdir)
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/best.ckpt"
    ]


@pytest.mark.slow
def test_changed_configuration_starts_a_new_run(workdir):
    assert run_module("pipeline.train", "--variant", "conv", cwd=workdir).returncode == 0
    write_params(workdir, {"train": {"lr": 0.05}})
    assert run_module("pipeline.train", "--variant", "conv", cwd=workdir).returncode == 0
    runs = _runs(workdir)
    assert len(runs) == 2 and {r.data.params["train/lr"] for r in runs} == {"0.1", "0.05"}


@pytest.mark.slow
def test_rerun_after_a_finished_run_trains_afresh(workdir):
    """DVC re-runs a stage after a code change with the same params: it must not re-report the old
    checkpoint as a new result."""
    assert run_module("pipeline.train", "--variant", "conv", cwd=workdir).returncode == 0
    assert "Restoring states" not in stage_log(workdir, "train@conv")
    shutil.rmtree(workdir / "logs")  # the re-run's log alone
    again = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restoring states" not in stage_log(workdir, "train@conv") and "starting afresh" in again.stdout
    runs = _runs(workdir)
    assert len(runs) == 2 and all(
        len(mlflow.MlflowClient().get_metric_history(r.info.run_id, "val_top1")) == 2 for r in runs
    )


@pytest.mark.slow
def test_interrupted_run_missing_from_the_store_starts_a_new_run(workdir):
    assert run_module("pipeline.train", "--variant", "conv", cwd=workdir).returncode == 0
    state_file = workdir / "checkpoints" / "conv" / "seed-0" / "run.json"
    state = json.loads(state_file.read_text())
    state.pop("finished")  # as if killed before the end
    state_file.write_text(json.dumps(state))
    (workdir / "mlflow.db").unlink()
    again = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    (run,) = _runs(workdir)
    assert run.info.run_id != state["run_id"] and run.info.status == "FINISHED"


@pytest.mark.parametrize("form", ["conv", "full_attention"])
def test_lightnings_model_summary_shows_the_flops_sasa_counts(form):
    """Lightning prints a model summary at the start of every run: its FLOPs (counted on the module's
    example input) are the run's logged ``flops``, not 0."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from pipeline.module import Classifier

    module = Classifier(
        {**TINY["models"]["common"], "form": form}, num_classes=10, in_chans=1, train=TINY["train"], resolution=20
    )
    expected = sasa.count(module.model, (1, 20, 20)).flops
    assert ModelSummary(module, max_depth=1).total_flops == expected > 0


@pytest.mark.slow
def test_compile_option_runs_the_attention_model_compiled():
    """train.compile: torch.compile traces through the local-attention custom op (its fake
    implementations must match the real kernels' shapes and strides, forward and backward), the
    compiled model computes what the eager one does, and checkpoints keep their keys."""
    from pipeline.module import Classifier

    arch = {**TINY["models"]["common"], "form": "full_attention"}
    # float64 and eval-mode batch norm: a random 26-layer net amplifies float32 reordering noise
    module = (
        Classifier(arch, num_classes=10, in_chans=1, train={**TINY["train"], "compile": True}, resolution=28)
        .double()
        .eval()
    )
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    eager_grads = torch.autograd.grad(module.model(x).square().sum(), list(module.model.parameters()))
    out = module(x)
    compiled_grads = torch.autograd.grad(out.square().sum(), list(module.model.parameters()))
    torch.testing.assert_close(out, module.model(x))
    for g, g_eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, g_eager)
    model_keys = {f"model.{key}" for key in module.model.state_dict()}
    assert set(module.state_dict()) == model_keys
    eager = Classifier(arch, num_classes=10, in_chans=1, train=TINY["train"], resolution=28)
    assert set(eager.state_dict()) == model_keys


@pytest.mark.slow
def test_seeds_train_in_turn_and_an_interrupted_stage_keeps_the_seeds_it_finished(workdir):
    from pipeline.stats import estimate

    write_params(workdir, {"train": {"seeds": [0, 1], "epochs": 2, "limit_train_batches": 6}})
    proc, err = _sigterm_once_written(workdir, workdir / "checkpoints" / "conv" / "seed-1" / "last.ckpt")
    assert proc.returncode == 130, err[-3000:]
    statuses = {r.data.tags["sasa.seed"]: r.info.status for r in _runs(workdir)}
    assert statuses == {"0": "FINISHED", "1": "KILLED"}

    again = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train@conv seed 0: finished before the stage was interrupted" in again.stdout
    assert "train@conv seed 1: MLflow run" in again.stdout and "resuming from" in again.stdout
    runs = _runs(workdir)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    summary = json.loads((workdir / "metrics" / "conv.json").read_text())
    top1 = {r.data.tags["sasa.seed"]: r.data.metrics["top1"] for r in runs}
    assert {s: v["top1"] for s, v in summary["seeds"].items()} == top1
    e = estimate(list(top1.values()))
    assert (summary["top1"], summary["top1_ci95"], summary["n"]) == (e.mean, e.half_width, 2)

    # the stage finished: a later run (DVC after a code change) retrains every seed
    third = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert third.returncode == 0 and "finished before the stage was interrupted" not in third.stdout
    assert len(_runs(workdir)) == 4
