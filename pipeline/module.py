"""The project's one training loop: a LightningModule over ``sasa.create_model``, its data and
counts (``build_run``) and the Trainer that runs it (``build_trainer``), shared by the ``train``
stage and every ``sweep`` trial, for classifiers (``Classifier``) and detectors
(``pipeline.detection.Detector``) alike."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import EMAWeightAveraging
from torchmetrics.classification import MulticlassAccuracy

import sasa
from pipeline.config import ArchConfig, DataConfig, TrainConfig
from pipeline.data import PREPARED, PreparedDataModule
from sasa.layers.moe import aux_loss as moe_aux_loss


def warmup_cosine(step, warmup_steps, total_steps):
    """Linear warm-up to 1, then cosine decay to 0: the paper's schedule as a LambdaLR factor."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class NonFiniteLoss(Exception):
    """The training loss became NaN or inf."""


class StopOnNonFiniteLoss(pl.Callback):
    """Stop at the first NaN/inf loss, before its backward pass: no weight, optimizer state or
    checkpoint ever sees it, and the message names the epoch and step. Any rank's loss counts."""

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            raise NonFiniteLoss(
                f"the training loss is {loss.item()} at epoch {trainer.current_epoch} (counting from 0), batch "
                f"{trainer.fit_loop.epoch_loop.batch_idx} of the epoch, global step {trainer.global_step}"
            )


class StopAtBatchEnd(pl.Callback):
    """Ctrl-C (and SIGTERM, which the stages turn into Ctrl-C) stops training at the next batch
    boundary rather than wherever it lands: an interrupt inside an MLflow write leaves a SQLite store
    locked. The decision is reduced over the ranks at every batch end, so a signal to any one rank
    (or to each at a slightly different moment, as torchrun and SLURM deliver them) stops all of
    them at the same step, none left waiting in a collective. Lightning then shuts down as for
    Ctrl-C; a second Ctrl-C stops this process at once. Main thread only."""

    def __init__(self):
        self.requested, self.previous = False, None

    def _request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def _stop_if_requested(self, trainer, *args):
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            raise KeyboardInterrupt

    on_train_batch_end = on_validation_batch_end = _stop_if_requested

    def on_fit_start(self, trainer, pl_module):
        self.previous = signal.signal(signal.SIGINT, self._request)

    def _take_sigterm(self, *args):
        """Lightning registers a SIGTERM handler of its own just before the loops run; on a DDP rank it
        broadcasts from inside the handler, on the signalled rank alone, and the run hangs. Replaced
        here (Lightning restores the stage's handler at teardown)."""
        signal.signal(signal.SIGTERM, self._request)

    on_sanity_check_start = on_train_start = _take_sigterm

    def _restore(self, *args):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    on_fit_end = on_exception = _restore


class TrainedModule(pl.LightningModule):
    """What every model the pipeline trains shares: the optimizer (no weight decay on 1-D parameters),
    the peak learning rate and the warm-up + cosine schedule, all from ``self.train_cfg``."""

    train_cfg: TrainConfig

    def configure_norms(self, model: nn.Module):
        """``train.bn_decay``, if set, as every batch norm's running-average decay (PyTorch's
        momentum is the weight of the new batch)."""
        if self.train_cfg.bn_decay is not None:
            for norm in model.modules():
                if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                    norm.momentum = 1 - self.train_cfg.bn_decay

    def peak_lr(self) -> float:
        """``train.lr``, or with ``lr_reference_batch`` set, ``lr`` per that many images scaled
        linearly to the global batch (batch_size x devices x nodes): the paper's 1.6 at 4096."""
        cfg = self.train_cfg
        if cfg.lr_reference_batch is None:
            return cfg.lr
        return cfg.lr * cfg.batch_size * self.trainer.world_size / cfg.lr_reference_batch

    def configure_optimizers(self):
        cfg = self.train_cfg
        decay, no_decay = [], []
        for p in self.parameters():  # no weight decay on norms, biases and embeddings' 1-D vectors
            (decay if p.ndim > 1 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        lr = self.peak_lr()
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
            )
        else:  # momentum is beta1
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = round(cfg.warmup_epochs * total / cfg.epochs)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Classifier(TrainedModule):
    def __init__(self, arch: dict, num_classes: int, in_chans: int, train: dict, resolution: int):
        super().__init__()
        self.save_hyperparameters(logger=False)  # in checkpoints; runs get the project's own params (pipeline.tracking)
        self.train_cfg = TrainConfig(**train)
        arch = ArchConfig(**arch)
        if arch.task != "classification":
            raise ValueError(f"model={arch.model_name!r} is a {arch.task} model; a Classifier trains classifiers")
        self.model = arch.build(num_classes=num_classes, in_chans=in_chans)
        # one image: Lightning's model summary counts its FLOPs with the counter sasa.count uses
        self.example_input_array = torch.zeros(1, in_chans, resolution, resolution)
        self.memory_format = torch.channels_last if self.train_cfg.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.configure_norms(self.model)
        # the compiled forward function is not a module: state-dict keys and checkpoints stay the same
        self._compiled = torch.compile(self.model.forward) if self.train_cfg.compile else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.train_cfg.label_smoothing)
        top5 = min(5, num_classes)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def forward(self, x):
        x = x.contiguous(memory_format=self.memory_format)
        return self.model(x) if self._compiled is None else self._compiled(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        aux, parts = moe_aux_loss(self.model)  # sparse experts' load-balancing and router z-losses, if any
        if aux is not None:
            loss = loss + aux
            self.log_dict({f"moe_{k}": v for k, v in parts.items()}, on_step=False, on_epoch=True, sync_dist=True)
        self.train_top1(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train_top1", self.train_top1, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_top1(logits, y)
        self.val_top5(logits, y)
        self.log("val_loss", self.criterion(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val_top1", self.val_top1, on_epoch=True, prog_bar=True)
        self.log("val_top5", self.val_top5, on_epoch=True)


def precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    on_gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def build_trainer(cfg: TrainConfig, **overrides) -> pl.Trainer:
    """A Trainer configured by the train section, stopping on a non-finite loss; callers add
    callbacks, logger, plugins, or replace the device placement (a sweep trial runs where Ray puts it)."""
    kwargs = dict(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=precision(cfg),
        limit_train_batches=cfg.limit_train_batches,
        limit_val_batches=cfg.limit_val_batches,
        sync_batchnorm=cfg.sync_batchnorm,
        enable_progress_bar=cfg.progress_bar,
        log_every_n_steps=1,
    )
    callbacks = [StopOnNonFiniteLoss(), *overrides.pop("callbacks", [])]
    if cfg.ema_decay:
        callbacks.append(EMAWeightAveraging(decay=cfg.ema_decay))
    return pl.Trainer(**{**kwargs, **overrides}, callbacks=callbacks)


@dataclass
class Run:
    """What one training run trains: the data, the module and the model's exact counts."""

    data: pl.LightningDataModule  # PreparedDataModule or pipeline.detection.DetectionDataModule
    module: TrainedModule  # Classifier or pipeline.detection.Detector
    counts: sasa.Counts


def build_run(
    data: DataConfig, arch: ArchConfig, train: TrainConfig, seed: int, prepared: str | Path = PREPARED
) -> Run:
    """The run of one seed, seeded the same way wherever it runs (a stage's process, each DDP rank, a
    Ray trial); checks ``prepared`` before anything is built."""
    pl.seed_everything(seed, workers=True)
    if arch.task == "detection":
        from pipeline.detection import DetectionDataModule, Detector  # which builds on this module

        datamodule = DetectionDataModule(data, train.batch_size, prepared, seed=seed)
        meta = datamodule.meta
        module = Detector(
            arch.model_dump(), meta["num_classes"], meta["in_chans"], train.model_dump(), data.resolution,
            meta["mean"], meta["std"],
        )  # fmt: skip
    else:
        datamodule = PreparedDataModule(data, train.batch_size, prepared, seed=seed)
        module = Classifier(
            arch.model_dump(), datamodule.num_classes, datamodule.in_chans, train.model_dump(), data.resolution
        )
    counts = sasa.count(module.model, (datamodule.in_chans, data.resolution, data.resolution))
    return Run(datamodule, module, counts)
