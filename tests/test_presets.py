"""The ready params files under configs/ are valid (every variant and sweep architecture builds)
and say what the paper did; the recipe's knobs do what they say in a real Trainer."""
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from pipeline.config import DataConfig, TrainConfig, load_config
from pipeline.data import PreparedDataModule
from pipeline.module import Classifier, build_trainer
from tests.conftest import TINY

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_builds(path):
    load_config(path)


def test_the_imagenet_preset_is_the_papers_recipe_and_table1():
    cfg = load_config(PRESETS[[p.name for p in PRESETS].index("imagenet.yaml")])
    t = cfg.train
    global_batch = t.batch_size * t.devices * t.num_nodes
    assert t.lr * global_batch / t.lr_reference_batch == pytest.approx(1.6) and global_batch == 4096
    assert (t.epochs, t.warmup_epochs, t.optimizer, t.nesterov) == (130, 10, "sgd", True)
    assert (t.ema_decay, t.bn_decay, t.sync_batchnorm, cfg.data.resolution) == (0.9999, 0.9999, True, 224)
    table1 = {(a.model_name, a.form_name) for a in (cfg.models.resolved(v) for v in cfg.models.variants)}
    assert table1 == {(m, f) for m in ("resnet26", "resnet38", "resnet50") for f in ("conv", "conv_stem_attention", "full_attention")}
    assert cfg.sweep.space == {"kernel_size": [3, 5, 7, 9, 11]} and cfg.sweep.scheduler.type == "fifo"


class _RecordLr(pl.Callback):
    """The peak learning rate the optimizer was built with (the schedule's base)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr = trainer.optimizers[0].param_groups[0]["initial_lr"]


def test_lr_scales_with_the_global_batch_and_bn_decay_reaches_every_norm(prepared_mnist):
    train = TrainConfig(**{**TINY["train"], "epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1,
                           "lr": 0.4, "lr_reference_batch": 128, "batch_size": 32, "bn_decay": 0.9999, "warmup_epochs": 0})
    module = Classifier({**TINY["models"]["common"], "form": "conv"}, 10, 1, train.model_dump())
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(1e-4) for m in norms)
    record = _RecordLr()
    trainer = build_trainer(train, logger=False, enable_checkpointing=False, callbacks=[record])
    trainer.fit(module, datamodule=PreparedDataModule(DataConfig(**TINY["data"]), 32, prepared_mnist))
    assert record.lr == pytest.approx(0.4 * 32 / 128)
