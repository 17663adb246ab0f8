"""Stage ``train``: train one model variant with Lightning, track it in MLflow, resume if interrupted.

``python -m pipeline.train --variant NAME``. Checkpoints go to ``checkpoints/NAME/`` every epoch;
``run.json`` there records the MLflow run and a fingerprint of the variant's configuration. A re-run
with the same fingerprint resumes from ``last.ckpt`` into the same MLflow run; a changed
configuration starts afresh. Each epoch's shuffling and augmentation are seeded by (seed, epoch),
so a resumed run ends with the same weights and metrics as an uninterrupted one. Ctrl-C or SIGTERM
marks the MLflow run KILLED, a NaN/inf loss stops training (run FAILED) before it touches the
weights or the checkpoints. The stage writes ``metrics/NAME.json`` (what DVC tracks) last.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient
from mlflow.entities import Param

import sasa
from pipeline import preflight
from pipeline.config import Config, ConfigError
from pipeline.data import PreparedDataModule
from pipeline.module import Classifier, NonFiniteLoss, StopAtBatchEnd, build_trainer
from pipeline.stage import StageError, atomic_write_text, run_stage
from pipeline.tracking import experiment_id, flatten, run_in_experiment, source_tags, tracking_uri

CHECKPOINTS = Path("checkpoints")
METRICS = Path("metrics")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file and rename it, so a kill mid-write never leaves a
    truncated ``last.ckpt`` to resume from (Lightning writes in place)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class Throughput(pl.Callback):
    """Training images per second over each epoch, all processes together, data loading included."""

    def __init__(self):
        self.rates = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.images, self.start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += batch[0].shape[0] * trainer.world_size
        self.end = time.perf_counter()  # epoch end hooks run after validation and checkpointing

    def on_train_epoch_end(self, trainer, pl_module):
        rate = self.images / (self.end - self.start)
        self.rates.append(rate)
        pl_module.log("train_images_per_s", rate, rank_zero_only=True)


def _is_global_zero() -> bool:
    """True in the process that launches training (DDP re-executes this script for other ranks)."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def _resumable_run(cfg: Config, variant: str, ckpt_dir: Path) -> str | None:
    """The MLflow run of an *interrupted* attempt with the same configuration, else None.

    Read-only, so every rank reaches the same decision whatever order they start in. A finished
    attempt is never resumed: DVC re-runs a stage after a code or data change, and that must train
    afresh rather than re-report the old checkpoint.
    """
    state_file = ckpt_dir / "run.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if state.get("finished") or state.get("fingerprint") != cfg.fingerprint(variant):
        return None
    return state["run_id"]


def _start_or_resume_run(cfg: Config, variant: str, ckpt_dir: Path, run_id: str | None, counts: sasa.Counts) -> str:
    """Rank 0: continue the interrupted run ``run_id`` if it lives in the configured experiment,
    otherwise discard the old checkpoints and create a run."""
    client = MlflowClient(tracking_uri(cfg))
    exp_id = experiment_id(client, cfg)
    if run_id and run_in_experiment(client, run_id, exp_id):
        client.update_run(run_id, status="RUNNING")  # it may have been marked KILLED or FAILED
        return run_id
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    arch = cfg.models.resolved(variant)
    fingerprint = cfg.fingerprint(variant)
    tags = {"sasa.kind": "train", "sasa.variant": variant, "dvc.stage": f"train@{variant}", "sasa.fingerprint": fingerprint}
    tags.update({"sasa.model": arch.model_name, "sasa.form": arch.form_name, "sasa.mixer": arch.mixer_name}, **source_tags())
    run = client.create_run(exp_id, run_name=variant, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten("data", cfg.data.model_dump()).items()])
    for name, value in counts.as_dict().items():
        client.log_metric(run.info.run_id, name, value)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ckpt_dir / "run.json", json.dumps({"fingerprint": fingerprint, "run_id": run.info.run_id}))
    return run.info.run_id


def train(cfg: Config, variant: str) -> dict | None:
    if variant not in cfg.models.variants:
        raise ConfigError(f"--variant {variant!r} is not in models.variants; defined: {', '.join(cfg.models.variants)}")
    data = PreparedDataModule(cfg.data, cfg.train.batch_size, seed=cfg.train.seed)  # checks data/prepared first
    preflight.devices(cfg.train)
    preflight.tracking(cfg)
    pl.seed_everything(cfg.train.seed, workers=True)
    arch = cfg.models.resolved(variant)
    module = Classifier(arch.model_dump(), data.num_classes, data.in_chans, cfg.train.model_dump())
    counts = sasa.count(module.model, (data.in_chans, cfg.data.resolution, cfg.data.resolution))
    ckpt_dir = CHECKPOINTS / variant
    resume_id = _resumable_run(cfg, variant, ckpt_dir)
    if _is_global_zero():
        run_id = _start_or_resume_run(cfg, variant, ckpt_dir, resume_id, counts)
        resume = run_id == resume_id
    else:  # other ranks log nothing; they follow the same read-only resume decision
        run_id, resume = None, resume_id is not None

    throughput = Throughput()
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_top1", mode="max", save_top_k=1, save_last=True),
        throughput,
        StopAtBatchEnd(),
    ]
    if cfg.train.ema_decay:
        callbacks.append(EMAWeightAveraging(decay=cfg.train.ema_decay))
    trainer = build_trainer(
        cfg.train,
        logger=MLFlowLogger(experiment_name=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg), run_id=run_id),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    last = ckpt_dir / "last.ckpt"
    try:
        trainer.fit(module, datamodule=data, ckpt_path=last if resume and last.is_file() else None, weights_only=True)
    except NonFiniteLoss as err:  # Lightning has marked the run FAILED
        raise StageError(f"{err}. Training stopped before that step; {_describe(last)}. Lower train.lr or check the data.") from None
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C (and so SIGTERM) into SystemExit
        if trainer.is_global_zero:
            MlflowClient(tracking_uri(cfg)).set_terminated(run_id, "KILLED")
        raise KeyboardInterrupt from None
    if not trainer.is_global_zero:
        return None
    return _finish(cfg, variant, run_id, trainer, throughput, counts, ckpt_dir)


def _describe(last: Path) -> str:
    if not last.is_file():
        return "no checkpoint had been written yet"
    epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    return f"the last good checkpoint, {last} (end of epoch {epoch}), is intact"


def _finish(cfg, variant, run_id, trainer, throughput, counts, ckpt_dir):
    client = MlflowClient(tracking_uri(cfg))
    history = client.get_run(run_id).data.metrics
    final = {k: float(trainer.callback_metrics.get(k, history.get(k, float("nan")))) for k in ("val_top1", "val_top5")}
    rates = throughput.rates or [m.value for m in client.get_metric_history(run_id, "train_images_per_s")]
    rate = statistics.median(rates) if rates else float("nan")
    results = {"top1": final["val_top1"], "top5": final["val_top5"], "throughput_images_per_s": rate}
    for name, value in results.items():
        client.log_metric(run_id, name, value)
    best = ckpt_dir / "best.ckpt"
    if best.is_file():
        client.log_artifact(run_id, str(best), artifact_path="checkpoints")
    summary = {"variant": variant, "run_id": run_id, **results, **counts.as_dict(), "epochs": trainer.current_epoch}
    atomic_write_text(METRICS / f"{variant}.json", json.dumps(summary, indent=2))
    state_file = ckpt_dir / "run.json"
    atomic_write_text(state_file, json.dumps({**json.loads(state_file.read_text()), "finished": True}))
    print(f"{variant}: top-1 {results['top1']:.4f}, {counts.flops / 1e6:.1f} MFLOPs, {counts.params / 1e6:.3f} M params")
    return summary


def main(argv=None):
    run_stage(
        __doc__.splitlines()[0],
        lambda cfg, args: train(cfg, args.variant),
        add_arguments=lambda p: p.add_argument("--variant", required=True, help="a key of models.variants"),
        argv=argv,
    )


if __name__ == "__main__":
    main()
