"""MLflow conventions of the project: where runs go, and the tags that tie a run to its code."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.config import Config


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` wins over ``mlflow.tracking_uri`` (e.g. a shared server on a cluster)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri


def experiment_id(client: MlflowClient, cfg: Config) -> str:
    """The id of ``mlflow.experiment``, created on first use."""
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    return experiment.experiment_id if experiment else client.create_experiment(cfg.mlflow.experiment)


def run_in_experiment(client: MlflowClient, run_id: str, experiment_id: str) -> bool:
    """Whether a run recorded on disk can be continued: it still exists, in this experiment."""
    try:
        return client.get_run(run_id).info.experiment_id == experiment_id
    except MlflowException:  # e.g. the tracking store was deleted or replaced
        return False


def source_tags() -> dict[str, str]:
    """The git commit the run's code came from, when there is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"mlflow.source.git.commit": out.stdout.strip()} if out.returncode == 0 else {}


def flatten(prefix: str, values: dict) -> dict[str, str]:
    return {f"{prefix}/{k}": str(v) for k, v in values.items()}


def resolved_architecture(model, model_name: str) -> dict:
    """What a run's network is, every default filled in (``model.config``), without the data's class
    and channel counts or ``form`` (a shorthand for stem and attention groups): two runs with equal
    resolved architectures trained the same network, whatever they were called."""
    config = getattr(model, "config", {})
    return {"model": model_name, **{k: v for k, v in config.items() if k not in ("num_classes", "in_chans", "form")}}


def resolved_params(model, model_name: str) -> dict[str, str]:
    """The resolved architecture as MLflow params ``resolved/KEY`` (JSON values), which the report reads back."""
    return {f"resolved/{k}": json.dumps(v) for k, v in resolved_architecture(model, model_name).items()}


def run_identity(model, model_name: str, recipe: str, seed: int) -> dict[str, str]:
    """Tags every training run carries, variant or sweep trial: the report pools runs by ``sasa.arch``
    (a hash of the resolved architecture) within one ``sasa.recipe``, and pairs them by ``sasa.seed``."""
    arch = resolved_architecture(model, model_name)
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    return {"sasa.arch": digest, "sasa.recipe": recipe, "sasa.seed": str(seed), "sasa.model": model_name,
            "sasa.form": getattr(model, "config", {}).get("form", ""), "sasa.mixer": arch.get("mixer", "")}
