"""MLflow conventions of the project: where runs go, and the tags that tie a run to its code."""
from __future__ import annotations

import os
import subprocess

from pipeline.config import Config


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` wins over ``mlflow.tracking_uri`` (e.g. a shared server on a cluster)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def flatten(prefix: str, values: dict) -> dict[str, str]:
    return {f"{prefix}/{k}": str(v) for k, v in values.items()}
