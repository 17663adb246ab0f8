"""The transformer families in the pipeline: every family of configs/transformers.yaml builds from
params, trains a real step and is counted exactly, bad variants name the key, a timm option is swept like any other key,
and the train stage, a sweep and the report treat them as they treat a ResNet."""

import csv
import functools
import math

import mlflow
import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

import sasa
from pipeline import preset
from pipeline.config import ConfigError, DataConfig, TrainConfig, load_config, validate
from pipeline.data import PreparedDataModule
from pipeline.module import Classifier, build_trainer
from pipeline.report import report
from pipeline.train import train as train_variant
from tests.helpers import REPO, TINY, run_module, write_params


@functools.cache
def _preset():
    return validate(preset.resolve(REPO / "configs" / "transformers.yaml"), "transformers.yaml")


FAMILIES = ("vit", "vit_moe", "maxvit", "coatnet", "levit", "mvitv2", "cvt")


def test_the_preset_holds_every_family_and_sweeps_a_timm_option():
    cfg = _preset()
    assert set(FAMILIES) <= set(cfg.models.variants)
    kinds = {cfg.models.resolved(v).build(num_classes=10, in_chans=1).config.get("family") for v in FAMILIES}
    assert kinds == {"ViT", "MaxViT", "CoAtNet", "LeViT", "MViTv2", None}  # CvT is this library's
    assert cfg.sweep.base == "vit" and "model_args.patch_size" in cfg.sweep.space
    vit, moe = (cfg.models.resolved(v).build(num_classes=10, in_chans=1).config for v in ("vit", "vit_moe"))
    assert moe == {**vit, "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 1.25}}  # runs of the two never pool


@pytest.mark.parametrize("variant", FAMILIES)
def test_each_family_builds_from_params_and_trains_one_real_step(variant, prepared_mnist):
    arch = _preset().models.resolved(variant)
    train = TrainConfig(
        **{**TINY["train"], "epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1, "warmup_epochs": 0}
    )
    module = Classifier(arch.model_dump(), 10, 1, train.model_dump(), resolution=32)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = build_trainer(train, logger=False, enable_checkpointing=False)
    trainer.fit(
        module, datamodule=PreparedDataModule(DataConfig(**{**TINY["data"], "resolution": 32}), 32, prepared_mnist)
    )
    assert trainer.global_step == 1 and math.isfinite(float(trainer.callback_metrics["train_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "one step changed no weight"
    moe_logged = {k for k in trainer.callback_metrics if k.startswith("moe_")}
    assert moe_logged == (
        {"moe_load_balance", "moe_router_z", "moe_dropped_fraction"} if variant == "vit_moe" else set()
    )


@pytest.mark.parametrize("variant", [v for v in FAMILIES if v != "cvt"])
def test_fused_attention_counts_as_its_math_path(variant):
    """The CPU's fused attention kernel (which the counter alone scores 0) counts exactly what the
    unfused math path's matmuls count, for every timm family; parameters are timm's own."""
    arch = _preset().models.resolved(variant)
    model = arch.build(num_classes=10, in_chans=1)
    fused = sasa.count(model, (1, 32, 32))
    with sdpa_kernel(SDPBackend.MATH):
        math_path = sasa.count(model, (1, 32, 32))
    assert fused == math_path
    import timm

    kwargs = {k: v for k, v in arch.model_args.items() if k != "moe"}
    if "moe" not in arch.model_args:
        twin = timm.create_model(
            arch.model_name.split(":", 1)[1], pretrained=False, num_classes=10, in_chans=1, **kwargs
        )
        assert fused.params == sum(p.numel() for p in twin.parameters())


@pytest.mark.parametrize(
    "variant,message",
    [
        ({"model": "timm:vit_tiny_patch16_22"}, "is not a timm model; close matches: timm:vit_tiny_patch16_224"),
        (
            {"model": "timm:vit_tiny_patch16_224", "model_args": {"img_size": 32, "patch_sz": 4}},
            "unexpected keyword argument 'patch_sz'",
        ),
        ({"model": "timm:vit_tiny_patch16_224", "model_args": {"pretrained": True}}, "built untrained here"),
        ({"model": "timm:vit_tiny_patch16_224", "model_args": {"img_size": 32}, "heads": 2}, "heads: ResNet keys"),
        ({"model": "timm:vit_tiny_patch16_224"}, "does not fit models.variants.bad: it fails on 28 px images"),
        (
            {"model": "resnet26", "model_args": {"img_size": 32}},
            "model_args is for models beyond the ResNets and their detectors",
        ),
    ],
)
def test_bad_model_variants_name_the_key_and_what_is_allowed(variant, message):
    params = {
        **TINY,
        "models": {**TINY["models"], "variants": {"bad": variant}},
        "sweep": {**TINY["sweep"], "base": "bad"},
    }
    with pytest.raises(ConfigError, match=message):
        validate(params, "test params")


def test_a_timm_option_is_swept_like_any_other_key():
    models = {
        **TINY["models"],
        "variants": {
            "vit": {
                "model": "timm:vit_tiny_patch16_224",
                "model_args": {"img_size": 28, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
            }
        },
    }
    cfg = validate(
        {
            **TINY,
            "models": models,
            "sweep": {**TINY["sweep"], "base": "vit", "space": {"model_args.patch_size": [7, 14]}},
        },
        "t",
    )
    assert cfg.trial_arch({"model_args.patch_size": 7}).model_args == {
        **models["variants"]["vit"]["model_args"],
        "patch_size": 7,
    }
    with pytest.raises(
        ConfigError,
        match=r"sweep.space {'model_args.img_size': 32}: data.resolution=28 does not fit: it fails on 28 px",
    ):
        validate(
            {
                **TINY,
                "models": models,
                "sweep": {**TINY["sweep"], "base": "vit", "space": {"model_args.img_size": [32]}},
            },
            "t",
        )


@pytest.mark.slow
def test_transformers_train_sweep_and_report_beside_a_resnet(workdir):
    """The train stage, a real Ray Tune sweep over a timm option, and the report, as for a ResNet:
    resolved params, one marker (kind) per family, the swept value in the trial's run."""
    vit = {
        "model": "timm:vit_tiny_patch16_224",
        "model_args": {"img_size": 28, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
    }
    cvt = {
        "model": "cvt13",
        "model_args": {
            "depths": [1, 1],
            "dims": [8, 16],
            "heads": [1, 2],
            "embed_kernels": [3, 3],
            "embed_strides": [2, 2],
        },
    }
    write_params(
        workdir,
        {
            "models": {"variants": {"conv": {"form": "conv"}, "vit": vit, "cvt": cvt}},
            "train": {"seeds": [0], "epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1},
            "mlflow": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db"},
            "sweep": {"base": "vit", "train": {}, "scheduler": {"type": "fifo"}},
        },
    )
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["sweep"]["space"] = {"model_args.patch_size": [7]}  # in place of the tiny params' kernel_size
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = load_config("params.yaml")
    for variant in cfg.models.variants:
        train_variant(cfg, variant)
    sweep = run_module("pipeline.sweep", cwd=workdir)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (row,) = csv.DictReader((workdir / "sweep" / "results.csv").open())
    assert row["model_args.patch_size"] == "7" and row["kernel_size"] == "" and int(row["epochs"]) == 1
    report(cfg)

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    trial = next(r for r in runs if r.data.tags.get("sasa.kind") == "sweep_trial")
    assert trial.data.params["resolved/patch_size"] == "7" and trial.data.params["resolved/family"] == '"ViT"'
    trained = {r.data.tags["sasa.variant"]: r for r in runs if r.data.tags.get("sasa.kind") == "train"}
    assert trained["vit"].data.params["resolved/patch_size"] == "4" and trained["vit"].data.metrics["flops"] > 0
    loaded = mlflow.pytorch.load_model(f"runs:/{trained['cvt'].info.run_id}/model")
    assert loaded(torch.zeros(3, 1, 28, 28)).shape == (3, 10)

    kinds = {r["configuration"]: r["kind"] for r in csv.DictReader((workdir / "reports" / "results.csv").open())}
    assert kinds["vit"] == "ViT" and kinds["cvt"] == "CvT" and kinds["conv"] == "conv"
    md = (workdir / "reports" / "results.md").read_text()
    assert "| vit | timm:vit_tiny_patch16_224 | - | ViT |" in md and "| cvt | cvt13 | - | CvT |" in md
    families = md.split("## Model families beyond the ResNets", 1)[1].split("\n## ", 1)[0]
    assert "Baseline: the conv ResNet-26 (conv)" in families
    assert "| CvT | cvt |" in families and "| ViT | vit |" in families
    assert "| ViT | tiny model_args.patch_size=7 |" in families  # the trial, labelled by its swept value
