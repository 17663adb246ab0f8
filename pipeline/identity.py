"""Run identity: which parameters change a result, and the fingerprints hashed from the rest.

A training run is resumed (``run.json``) and found again by the report through its fingerprint, a
sweep through its own; runs of one recipe are compared across stages. ``RUNTIME_KEYS`` is the one
definition of what does not change a result: every fingerprint leaves those keys out (through
``result_dump``), and so do the stages' DVC params (``dvc.yaml``, checked against this module by
``tests/pipeline/test_identity.py``), so changing one re-runs and re-identifies nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import BaseModel

    from pipeline.config import Config, TrainConfig

# Where and how visibly runs train, not what they compute (as params.yaml key paths). Not
# sweep.resources.gpu or .workers: they pick the trials' accelerator, and workers > 1 makes each
# trial a DDP run over that many processes, which changes its global batch.
RUNTIME_KEYS = frozenset(
    {
        "data.num_workers",
        "train.progress_bar",
        "train.checkpoint_dir",
        "mlflow.tracking_uri",
        "mlflow.experiment",
        "sweep.address",
        "sweep.storage_path",
        "sweep.max_concurrent_trials",
        "sweep.resources.cpu",
        "sweep.max_failures",
    }
)


def runtime_exclude(section: str, *more: str) -> dict:
    """The run-time keys of one section (and ``more`` of its keys), as pydantic's nested ``exclude``:
    ``sweep`` -> ``{"address": True, ..., "resources": {"cpu": True}}``."""
    tree: dict = {}
    for key in (*(k.split(".", 1)[1] for k in RUNTIME_KEYS if k.startswith(f"{section}.")), *more):
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = True
    return tree


def result_dump(section: str, model: BaseModel, *more: str) -> dict:
    """``model``, which holds params.yaml's section ``section``, without its run-time keys (nor ``more``)."""
    return model.model_dump(exclude=runtime_exclude(section, *more))


def data_dump(cfg: Config) -> dict:
    """The data section as it changes results: neither run-time keys nor the sub-sections its source
    does not read (``data.canvas`` of a COCO run)."""
    return result_dump("data", cfg.data, *cfg.data.unread_sections())


def recipe(cfg: Config, train: TrainConfig) -> str:
    """How a run trains (data and train, not the seed): runs of one recipe are comparable, whatever
    their architecture and whichever stage trained them."""
    return _hash({"train": result_dump("train", train, "seeds"), "data": data_dump(cfg)})


def fingerprint(cfg: Config, variant: str, seed: int) -> str:
    """Everything that determines one training run of a variant; its architecture counts whole."""
    return _hash({"arch": cfg.models.resolved(variant).identity(), "recipe": recipe(cfg, cfg.train), "seed": seed})


def sweep_fingerprint(cfg: Config) -> str:
    """Everything that determines the sweep's trials; a change starts a new sweep."""
    payload = {
        "base": cfg.models.resolved(cfg.sweep.base).identity(),
        "train": result_dump("train", cfg.trial_train()),
        "data": data_dump(cfg),
        "sweep": result_dump("sweep", cfg.sweep),
    }
    return _hash(payload)


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
