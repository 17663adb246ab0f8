"""What changes a result is defined once (``pipeline.identity.RUNTIME_KEYS`` are the keys that do
not): the fingerprints leave exactly those out, and dvc.yaml tracks, per stage, the keys of the
sections the stage reads less those."""

import copy

import pytest
import yaml

from pipeline.config import validate
from pipeline.identity import RUNTIME_KEYS
from tests.helpers import REPO, leaves, within

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

# The sections (or parts) of params.yaml each stage's results depend on; ``{variant}`` and ``{base}``
# stand for a train stage's variant and sweep.base.
SECTIONS = {
    "prepare": ["data"],
    "train": ["data", "train", "models.common", "models.variants.{variant}"],
    "sweep": ["data", "train", "models.common", "models.variants.{base}", "sweep"],
    "report": ["data", "train", "models", "sweep", "report"],
}
APPLIED_WHEN_TRAINING = {"data.resolution", "data.hflip"}  # not in the prepared images
READS_RUNS_FROM = {"report": {"mlflow.tracking_uri", "mlflow.experiment"}}  # run-time, but where its runs are


def _stages(cfg) -> dict[str, tuple[str, list[str], dict]]:
    """Each stage (one per variant for train) -> (kind, its DVC params, the values of its templates)."""
    out = {}
    for name, spec in STAGES.items():
        if "foreach" in spec:
            for variant in cfg.models.variants:
                params = [p.replace("${key}", variant) for p in spec["do"]["params"]]
                out[f"{name}@{variant}"] = (name, params, {"variant": variant})
        else:
            params = [p.replace("${sweep.base}", cfg.sweep.base) for p in spec["params"]]
            out[name] = (name, params, {"base": cfg.sweep.base})
    return out


def test_each_stage_tracks_the_sections_it_reads_less_the_runtime_keys():
    cfg = validate(PARAMS, "params.yaml", builds=())
    keys = leaves(cfg.params_file())
    assert RUNTIME_KEYS <= keys, "a run-time key that params.yaml does not have"
    stages = _stages(cfg)
    assert {kind for kind, _, _ in stages.values()} == set(SECTIONS)
    for stage, (kind, listed, values) in stages.items():
        sections = [s.format(**values) for s in SECTIONS[kind]]
        wanted = {k for k in keys if any(within(k, s) for s in sections)} - RUNTIME_KEYS
        wanted |= READS_RUNS_FROM.get(kind, set())
        if kind == "prepare":
            wanted -= APPLIED_WHEN_TRAINING
        tracked = {k for k in keys if any(within(k, entry) for entry in listed)}
        assert tracked == wanted, (
            f"{stage}: not tracked {sorted(wanted - tracked)}, not wanted {sorted(tracked - wanted)}"
        )


def _with(params: dict, key: str, value) -> dict:
    out = copy.deepcopy(params)
    *parents, leaf = key.split(".")
    node = out
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    return out


def _identity(params: dict) -> dict:
    cfg = validate(params, "test params", builds=())
    return {
        "fingerprints": [cfg.fingerprint(v, s) for v in cfg.models.variants for s in cfg.train.seeds],
        "recipes": [cfg.recipe(cfg.train), cfg.recipe(cfg.trial_train())],
        "sweep": cfg.sweep_fingerprint(),
    }


ANOTHER = {  # a different valid value of each run-time key
    "data.num_workers": 7,
    "train.progress_bar": False,
    "train.checkpoint_dir": "elsewhere",
    "mlflow.tracking_uri": "sqlite:///elsewhere.db",
    "mlflow.experiment": "elsewhere",
    "sweep.address": "ray://head:10001",
    "sweep.storage_path": "s3://bucket/ray",
    "sweep.max_concurrent_trials": 3,
    "sweep.resources.cpu": 4,
    "sweep.max_failures": 0,
}


def test_no_runtime_key_changes_a_fingerprint():
    assert ANOTHER.keys() == RUNTIME_KEYS
    before = _identity(PARAMS)
    for key, value in ANOTHER.items():
        assert _identity(_with(PARAMS, key, value)) == before, key


@pytest.mark.parametrize("key, value", [("sweep.resources.workers", 2), ("sweep.resources.gpu", 1)])
def test_the_trials_accelerator_and_ddp_workers_start_a_new_sweep(key, value):
    before, after = _identity(PARAMS), _identity(_with(PARAMS, key, value))
    assert after["sweep"] != before["sweep"] and after["fingerprints"] == before["fingerprints"]


def test_fingerprints_of_a_fixed_config_are_stable():
    """Existing runs are resumed and reported by these hashes: a change here re-identifies every run."""
    params = {
        "data": {},
        "models": {"variants": {"conv": {"form": "conv"}}},
        "train": {},
        "mlflow": {},
        "report": {},
        "sweep": {"base": "conv", "space": {"kernel_size": [3, 5]}},
    }
    assert _identity(params) == {
        "fingerprints": ["e38adb082c3abf05"],
        "recipes": ["ccdca8f3ad3d644f", "ccdca8f3ad3d644f"],
        "sweep": "a19a3cf87f718167",
    }
