"""MLflow conventions of the project: where runs go, and the tags that tie a run to its code."""
from __future__ import annotations

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
