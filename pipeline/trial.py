"""A sweep trial: what Ray runs on a worker of any node, one process or a DDP job of Ray Train workers,
and ``trainable``, which the driver hands to Tune.

The train stage's module and data module, classifier or detector (``build_run``), in its Trainer
(``build_trainer``, so with the same EMA and NaN guard), reporting each epoch to Tune with a
checkpoint, so the scheduler may stop it there and a retried trial resumes from its last epoch.
``data/prepared`` travels as bytes through Ray's object store: a trial depends on no path of the
head node.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import ray
import ray.train
from ray import tune

import sasa
from pipeline.config import Config, is_arch_key
from pipeline.data import PREPARED
from pipeline.module import build_run, build_trainer
from pipeline.tasks import TASKS

CHECKPOINT = "last.ckpt"
# What a trial reports each epoch (with its model's counts) and the driver logs to its MLflow run:
# every task's validation results, and the training losses (a detector's two parts too).
TRIAL_METRICS = (
    *(f"val_{k}" for task in TASKS.values() for k in task.results),
    "val_loss",
    "train_loss",
    "train_top1",
    "train_classification",
    "train_bbox_regression",
)


def is_trial_metric(name: str) -> bool:
    """What a trial reports and its run logs: the metrics above and sparse experts' auxiliary losses."""
    return name in TRIAL_METRICS or name.startswith("moe_")


def split_trial_config(cfg: Config, config: dict):
    """A trial's sampled values -> its resolved architecture and train sections (its seed is ``config["seed"]``)."""
    arch = cfg.trial_arch({k: v for k, v in config.items() if is_arch_key(k)})
    train = cfg.trial_train({k: v for k, v in config.items() if not is_arch_key(k) and k != "seed"})
    return arch, train


class ReportEachEpoch(pl.Callback):
    """After every epoch (validation included): metrics, the model's counts, epochs completed, the node
    and a checkpoint to Ray, which lets the scheduler stop the trial and a retry resume from this epoch.
    ``session`` is ``ray.tune`` in a one-process trial, ``ray.train`` on each Ray Train worker.

    Ray's own callbacks do not fit (Ray 2.60). ``ray.tune.integration.pytorch_lightning.
    TuneReportCheckpointCallback`` reports ``trainer.callback_metrics`` alone, through ``ray.tune.report``:
    no node id (a string, which no Lightning metric holds) or epochs completed (the MLflow step and the
    results' ``epochs``), and on a Ray Train V2 worker ``ray.tune.report`` has no session, so it only
    warns and drops every report. ``ray.train.lightning.RayTrainReportCallback`` calls
    ``ray.train.get_context`` and ``ray.train.report``, which under Train V2 (the default) raise in a
    one-process Tune trial, and it reports the 0-based ``current_epoch`` and no node id either.
    """

    def __init__(self, counts: sasa.Counts, session):
        self.counts, self.session = counts, session

    def on_train_epoch_end(self, trainer, pl_module):
        logged = trainer.callback_metrics
        metrics = {k: float(v) for k, v in logged.items() if is_trial_metric(k)}
        metrics.update(
            self.counts.as_dict(), epoch=trainer.current_epoch + 1, node_id=ray.get_runtime_context().get_node_id()
        )
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(os.path.join(folder, CHECKPOINT))  # written by global rank 0 only
            checkpoint = self.session.Checkpoint.from_directory(folder) if trainer.is_global_zero else None
            self.session.report(metrics, checkpoint=checkpoint)


def pack_prepared() -> dict[str, bytes]:
    """On the driver: ``data/prepared`` as bytes, for Ray's object store. An image folder's images stay
    where ``meta.json``'s root says (shared storage)."""
    return {path.name: path.read_bytes() for path in PREPARED.iterdir() if path.is_file()}


@contextmanager
def _unpacked(prepared: dict[str, bytes]):
    with tempfile.TemporaryDirectory(prefix="sasa-prepared-") as folder:
        for name, data in prepared.items():
            Path(folder, name).write_bytes(data)
        yield folder


def fit_trial(config: dict, cfg: Config, prepared: dict[str, bytes], session, **placement):
    """The train stage's module and data in a Trainer placed by ``placement``, resumed from the
    trial's latest checkpoint in ``session`` (``ray.tune`` or ``ray.train``) when there is one."""
    arch, train = split_trial_config(cfg, config)
    with _unpacked(prepared) as folder:
        run = build_run(cfg.data, arch, train, config["seed"], folder)
        trainer = build_trainer(
            train,
            accelerator="gpu" if cfg.sweep.resources.gpu else "cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,  # the driver shows the sweep's one bar
            callbacks=[ReportEachEpoch(run.counts, session)],
            **placement,
        )
        checkpoint = session.get_checkpoint()
        if checkpoint is None:
            trainer.fit(run.module, datamodule=run.data)
            return
        with checkpoint.as_directory() as ckpt_folder:
            trainer.fit(
                run.module, datamodule=run.data, ckpt_path=os.path.join(ckpt_folder, CHECKPOINT), weights_only=True
            )


def run_trial(config: dict, cfg: Config, prepared: dict[str, bytes]):
    """A trial in one process (``resources.workers == 1``)."""
    fit_trial(config, cfg, prepared, tune, devices=1, num_nodes=1, strategy="auto")


def _ddp_worker(loop_config: dict):
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

    fit_trial(
        loop_config["trial"],
        loop_config["cfg"],
        ray.get(loop_config["prepared"]),
        ray.train,
        devices="auto",
        num_nodes=1,
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
    )


def run_ddp_trial(config: dict, cfg: Config, prepared: dict[str, bytes], storage: str):
    """A trial that is a DDP job of ``resources.workers`` Ray Train workers; this function only drives
    it. A retried trial starts a Train run of the same name, which resumes from its last checkpoint."""
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = cfg.sweep.resources
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"trial": config, "cfg": cfg, "prepared": ray.put(prepared)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=res.gpu > 0, resources_per_worker={"CPU": res.cpu, "GPU": res.gpu}
        ),
        run_config=ray.train.RunConfig(
            name=tune.get_context().get_trial_id(),
            storage_path=storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    trainer.fit()


def trainable(cfg: Config, path: str):
    """The trial as Tune's function trainable with its resources; ``path`` is the Tune experiment's."""
    res, prepared = cfg.sweep.resources, pack_prepared()  # with_parameters keeps it in the object store
    if res.workers > 1:  # the Train workers hold the resources; the function driving them next to none
        trial = tune.with_parameters(run_ddp_trial, cfg=cfg, prepared=prepared, storage=f"{path}/train")
        return tune.with_resources(trial, {"cpu": 0.01})
    trial = tune.with_parameters(run_trial, cfg=cfg, prepared=prepared)
    return tune.with_resources(trial, {"cpu": res.cpu, "gpu": res.gpu})
