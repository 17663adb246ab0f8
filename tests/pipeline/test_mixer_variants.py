"""Every registered mixer as a params.yaml variant: checked with the key named, trained a step by the
real Trainer, and swept as a Ray Tune trial."""

import csv

import mlflow
import pytest
import torch
import yaml

from pipeline.config import ConfigError, DataConfig, TrainConfig, load_config, validate
from pipeline.data import PreparedDataModule
from pipeline.module import Classifier, build_trainer
from sasa.layers import MIXER_INFO
from tests.helpers import TINY, run_module, write_params


def test_params_yaml_takes_a_mixer_per_variant_and_checks_its_options(tmp_path):
    variants = {
        "conv": {"form": "conv"},
        "halo": {"form": "conv_stem_attention", "mixer": "halo", "mixer_args": {"block_size": 4, "halo": 1}},
    }
    write_params(tmp_path, {"models": {"variants": variants}})
    cfg = load_config(tmp_path / "params.yaml")
    assert cfg.models.resolved("halo").mixer_name == "halo" and cfg.fingerprint("halo", 0) != cfg.fingerprint("conv", 0)
    variants["halo"]["mixer_args"] = {"block": 4}
    write_params(tmp_path, {"models": {"variants": variants}})
    with pytest.raises(ConfigError, match="models.variants.halo: mixer='halo' has no option 'block'"):
        load_config(tmp_path / "params.yaml")
    write_params(
        tmp_path,
        {"models": {"variants": {"conv": {"form": "full_attention", "mixer": "neighborhood", "kernel_size": 9}}}},
    )
    with pytest.raises(ConfigError, match="data.resolution=28 does not fit models.variants.conv: it needs at least 33"):
        load_config(tmp_path / "params.yaml")


VARIANTS = [
    *(
        {"mixer": name, "mixer_args": info.test_options, "attention_groups": list(info.groups)}
        for name, info in MIXER_INFO.items()
        if name != "conv"
    ),
    {"mixer": "bot", "mixer_args": {"evolve": 0.5}},
    {"mixer": "sasa", "block_attention": "gc"},
]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: v.get("block_attention") or str(v["mixer_args"].get("evolve") or v["mixer"])
)
def test_every_mixer_trains_a_resnet26_step_from_params(variant, prepared_mnist):
    params = {
        **TINY,
        "models": {**TINY["models"], "variants": {"v": {"form": "conv_stem_attention", **variant}}},
        "sweep": {**TINY["sweep"], "base": "v"},
    }
    cfg = validate(params, "test params")
    train = TrainConfig(
        **{**TINY["train"], "epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1, "warmup_epochs": 0}
    )
    module = Classifier(cfg.models.resolved("v").model_dump(), 10, 1, train.model_dump(), resolution=28)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = build_trainer(train, logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=PreparedDataModule(DataConfig(**TINY["data"]), 32, prepared_mnist))
    assert trainer.global_step == 1 and any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.slow
def test_a_sweep_over_mixers_runs_each_as_a_trial(workdir):
    """A real Ray Tune sweep over acmix, qna, lesa and elsa (gnconv and quadratic: test_sweep.py)."""
    mixers = ["acmix", "qna", "lesa", "elsa"]
    write_params(
        workdir,
        {
            "models": {"variants": {"attn": {"form": "conv_stem_attention"}}},
            "train": {"seeds": [0], "limit_train_batches": 2, "limit_val_batches": 1},
            "sweep": {"base": "attn", "train": {"epochs": 1}, "scheduler": {"type": "fifo"}},
        },
    )
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["sweep"]["space"] = {"mixer": mixers}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = run_module("pipeline.sweep", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((workdir / "sweep" / "results.csv").open()))
    assert sorted(r["mixer"] for r in rows) == sorted(mixers) and all(int(r["epochs"]) == 1 for r in rows)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    trials = [
        r
        for r in mlflow.search_runs(experiment_names=["test"], output_format="list")
        if r.data.tags.get("sasa.kind") == "sweep_trial"
    ]
    assert sorted(t.data.params["arch/mixer"] for t in trials) == sorted(mixers) and {
        t.info.status for t in trials
    } == {"FINISHED"}
