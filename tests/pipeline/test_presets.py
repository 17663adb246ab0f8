"""The ready params files under configs/ are valid (every variant and sweep architecture builds)
and say what the paper did; the recipe's knobs do what they say in a real Trainer."""

import functools
import itertools

import lightning.pytorch as pl
import pytest
import torch

from pipeline import preset
from pipeline.config import DataConfig, TrainConfig, load_config, validate
from pipeline.data import PreparedDataModule
from pipeline.module import Classifier, build_trainer
from sasa.paper import STEM_ABLATION, TABLE3, TABLE4, TABLE5
from tests.helpers import REPO, TINY, run_module

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@functools.cache
def _load(name):
    """A preset resolved and validated: every variant and sweep architecture built (once per session)."""
    return validate(preset.resolve(REPO / "configs" / name), name)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_builds(path):
    _load(path.name)


def _swept_and_base(cfg, key):
    """The values a preset's sweep and its base variant together give ``key`` (the report pools them)."""
    base = cfg.models.resolved(cfg.sweep.base).build(num_classes=10, in_chans=3).config[key]
    return {tuple(v) if isinstance(v, list) else v for v in [*cfg.sweep.space[key], base]}


def test_the_table_presets_cover_the_papers_rows_and_run_every_trial_to_the_end():
    cfg = _load("imagenet.yaml")
    assert _swept_and_base(cfg, "kernel_size") == set(TABLE4) and cfg.sweep.scheduler.type == "fifo"
    groups = _swept_and_base(_load("table3.yaml"), "attention_groups") | {()}  # [] is the conv variant
    assert groups == set(TABLE3)
    assert _swept_and_base(_load("table5.yaml"), "pos_enc") == set(TABLE5)
    assert _swept_and_base(_load("stem_ablation.yaml"), "stem") >= set(STEM_ABLATION)
    for name in ("table3.yaml", "table5.yaml", "stem_ablation.yaml"):
        cfg = _load(name)
        assert cfg.sweep.scheduler.type == "fifo" and cfg.train == _load("imagenet.yaml").train, name
        assert cfg.recipe(cfg.trial_train()) == cfg.recipe(cfg.train)  # trials pool with the variants


def test_the_cpu_study_repeats_every_ablation_over_five_seeds():
    cfg = _load("cpu_study.yaml")
    assert len(cfg.train.seeds) == 5 and cfg.data.source == "mnist5k" and cfg.train.accelerator == "cpu"
    archs = [cfg.models.resolved(v).build(num_classes=10, in_chans=1).config for v in cfg.models.variants]
    assert {a["stem"] for a in archs} >= set(STEM_ABLATION) and {a["pos_enc"] for a in archs} == set(TABLE5)
    assert len({a["attention_groups"] for a in archs if a["mixer"] == "sasa"}) >= 3
    assert _swept_and_base(cfg, "kernel_size") == {3, 5, 7}


@pytest.mark.slow
def test_applying_a_preset_writes_a_valid_params_file_and_a_bad_one_changes_nothing(tmp_path):
    out = tmp_path / "params.yaml"
    ok = run_module("pipeline.preset", str(REPO / "configs" / "table5.yaml"), "--out", str(out), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    cfg = load_config(out)
    assert cfg.sweep.space == {"pos_enc": ["none", "absolute"]} and len(cfg.models.variants) == 9  # imagenet.yaml's
    (tmp_path / "bad.yaml").write_text("extends: " + str(REPO / "configs" / "imagenet.yaml") + "\ntrain: {epochs: 0}\n")
    before = out.read_text()
    bad = run_module("pipeline.preset", str(tmp_path / "bad.yaml"), "--out", str(out), cwd=tmp_path)
    assert bad.returncode == 2 and "train.epochs" in bad.stderr and "is unchanged" in bad.stderr
    assert out.read_text() == before
    missing = run_module("pipeline.preset", "configs/nope.yaml", "--out", str(out), cwd=tmp_path)
    assert missing.returncode == 2 and "configs/nope.yaml: no such preset" in missing.stderr


def test_the_imagenet_preset_is_the_papers_recipe_and_table1():
    cfg = _load("imagenet.yaml")
    t = cfg.train
    global_batch = t.batch_size * t.devices * t.num_nodes
    assert t.lr * global_batch / t.lr_reference_batch == pytest.approx(1.6) and global_batch == 4096
    assert (t.epochs, t.warmup_epochs, t.optimizer, t.nesterov) == (130, 10, "sgd", True)
    assert (t.ema_decay, t.bn_decay, t.sync_batchnorm, cfg.data.resolution) == (0.9999, 0.9999, True, 224)
    table1 = {(a.model_name, a.form_name) for a in (cfg.models.resolved(v) for v in cfg.models.variants)}
    assert table1 == {
        (m, f) for m in ("resnet26", "resnet38", "resnet50") for f in ("conv", "conv_stem_attention", "full_attention")
    }


class _RecordLr(pl.Callback):
    """The peak learning rate the optimizer was built with (the schedule's base)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr = trainer.optimizers[0].param_groups[0]["initial_lr"]


def test_lr_scales_with_the_global_batch_and_bn_decay_reaches_every_norm(prepared_mnist):
    train = TrainConfig(
        **{
            **TINY["train"],
            "epochs": 1,
            "limit_train_batches": 1,
            "limit_val_batches": 1,
            "lr": 0.4,
            "lr_reference_batch": 128,
            "batch_size": 32,
            "bn_decay": 0.9999,
            "warmup_epochs": 0,
        }
    )
    module = Classifier({**TINY["models"]["common"], "form": "conv"}, 10, 1, train.model_dump(), resolution=28)
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(1e-4) for m in norms)
    record = _RecordLr()
    trainer = build_trainer(train, logger=False, enable_checkpointing=False, callbacks=[record])
    trainer.fit(module, datamodule=PreparedDataModule(DataConfig(**TINY["data"]), 32, prepared_mnist))
    assert record.lr == pytest.approx(0.4 * 32 / 128)


def _table2_rows(cfg) -> set[tuple[str, str]]:
    """The (backbone form, FPN + heads) pairs a preset trains: its variants and its sweep's grid."""
    rows = {(cfg.models.resolved(v).form, cfg.models.resolved(v).head_mixer) for v in cfg.models.variants}
    keys = [k for k in ("form", "head_mixer") if k in cfg.sweep.space]
    base = cfg.models.resolved(cfg.sweep.base)
    for values in itertools.product(*(cfg.sweep.space[k] for k in keys)):
        point = {"form": base.form, "head_mixer": base.head_mixer, **dict(zip(keys, values))}
        rows.add((point["form"], point["head_mixer"]))
    return rows


@pytest.mark.parametrize("name", ["coco.yaml", "table2.yaml"])
def test_the_detection_presets_train_every_row_of_table2(name):
    cfg = _load(name)
    forms = {"conv", "conv_stem_attention", "full_attention"}
    assert _table2_rows(cfg) == {(form, heads) for form in forms for heads in ("conv", "sasa")}
    assert cfg.data.task.name == "detection" and cfg.sweep.metric == "val_map"
    assert cfg.recipe(cfg.trial_train()) == cfg.recipe(cfg.train)  # trials pool with the variants
    if name == "coco.yaml":  # the paper's setting: RetinaNet ResNet-50 FPN on COCO at 640 px, k = 7
        assert {cfg.models.resolved(v).model for v in cfg.models.variants} == {"retinanet_resnet50"}
        assert (cfg.data.source, cfg.data.resolution, cfg.models.common.kernel_size) == ("coco", 640, 7)


def test_the_budget_preset_trains_the_three_forms_at_three_lengths_that_the_report_reads():
    from pipeline.report.runs import recipes

    cfg = _load("budget.yaml")
    forms = {cfg.models.resolved(v).form for v in cfg.models.variants} | set(cfg.sweep.space["form"])
    assert forms == {"conv", "conv_stem_attention", "full_attention"} and len(cfg.train.seeds) >= 5
    found = recipes(cfg)
    assert sorted(train["epochs"] for train in found.values()) == [2, 6, 18]
    assert cfg.recipe(cfg.train) in found and cfg.sweep.scheduler.type == "fifo"  # every trial to the end


def test_the_default_sweep_searches_two_spatial_extents_and_two_stems():
    cfg = load_config(REPO / "params.yaml")
    assert len(cfg.sweep.space["kernel_size"]) >= 2 and len(cfg.sweep.space["stem"]) >= 2
    base = cfg.models.resolved(cfg.sweep.base)
    # pooled with the variants: the grid leaves out what the variants train (k = 3 with either stem)
    assert base.kernel_size not in cfg.sweep.space["kernel_size"]
    assert {cfg.models.resolved(v).form for v in cfg.models.variants} >= {"conv_stem_attention", "full_attention"}
