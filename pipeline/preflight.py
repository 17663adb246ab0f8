"""Checks of the environment a stage needs, run after the config is validated and before any data,
model or tracking work: a failure is a ``ConfigError`` (exit 2) that names the key, or a
``StageError`` (exit 1) for a corrupt file, and leaves nothing behind (no MLflow run, no tracking
database, no checkpoint folder)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import torch

from pipeline.config import Config, ConfigError, TrainConfig
from pipeline.locations import redact
from pipeline.stage import StageError, read_json
from pipeline.tracking import tracking_uri

TRACKING_TIMEOUT_S = 3
# SQLAlchemy's driver names (its defaults first: postgresql:// is psycopg in SQLAlchemy 2.1, mysql:// mysqldb) and the
# package that provides each
DRIVER_PACKAGES = {
    "postgresql": {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000"},
    "mysql": {"mysqldb": "mysqlclient", "pymysql": "pymysql", "mysqlconnector": "mysql-connector-python"},
    "mssql": {"pyodbc": "pyodbc", "pymssql": "pymssql"},
}
META_KEYS = ("format", "counts", "num_classes", "in_chans", "mean", "std")  # what training reads of meta.json


def _tracking_key() -> str:
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "mlflow.tracking_uri"


def tracking(cfg: Config):
    """A server answers within a few seconds; a SQLite file can be created where it is meant to be;
    another database's driver is installed. Messages show the URI without its credentials."""
    uri = tracking_uri(cfg)
    shown = f"{_tracking_key()}={redact(uri)}"
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=TRACKING_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # it answered: reachable (authentication and the like are MLflow's to report)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(
                f"{shown}: no MLflow server answered within {TRACKING_TIMEOUT_S} s ({reason}); start one "
                f"(mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db) or use sqlite:///mlflow.db"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().absolute().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"{shown}: the folder {folder} does not exist or is not writable")
    elif "://" in uri:  # postgresql://, mysql+pymysql://, ...: SQLAlchemy loads the driver before connecting
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import NoSuchModuleError

        url = make_url(uri)
        try:
            dialect = url.get_dialect()
        except NoSuchModuleError:
            raise ConfigError(
                f"{shown}: SQLAlchemy has no {url.drivername!r} dialect; use one of "
                f"{', '.join(f'{scheme}://' for scheme in DRIVER_PACKAGES)} (optionally +DRIVER)"
            ) from None
        try:
            dialect.import_dbapi()
        except ImportError as err:
            package = DRIVER_PACKAGES.get(dialect.name, {}).get(dialect.driver, dialect.driver)
            raise ConfigError(
                f"{shown}: the {dialect.name} driver {dialect.driver!r} is not installed ({err}); "
                f"install it into this environment: pip install '{package}'"
            ) from None


def devices(train: TrainConfig, key: str = "train"):
    """The GPUs the section asks for exist on this machine (other nodes are the launcher's job)."""
    available = torch.cuda.device_count()
    wants_gpu = train.accelerator in ("gpu", "cuda")
    if wants_gpu and not available:
        raise ConfigError(f"{key}.accelerator={train.accelerator!r} but this machine has no CUDA GPU; use cpu or auto")
    if (
        (wants_gpu or (train.accelerator == "auto" and available))
        and isinstance(train.devices, int)
        and train.devices > available
    ):
        raise ConfigError(f"{key}.devices={train.devices} but this machine has {available} GPU(s)")


def prepared_data(folder: Path, batch_size: int, task: str, key: str = "train.batch_size") -> dict:
    """``data/prepared`` is complete, holds data of ``task`` and at least one training batch; returns its meta."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path} is missing: run the prepare stage first (dvc repro prepare)")
    fix = "run dvc repro -f prepare to write it again"
    meta = read_json(meta_path, fix)
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise StageError(f"{meta_path} is corrupt (it lacks {', '.join(missing)}): {fix}")
    if meta.get("task", "classification") != task:
        raise ConfigError(
            f"{folder} holds {meta.get('task', 'classification')} data ({meta['source']}), and {task} models "
            "are configured: run dvc repro prepare"
        )
    suffix = ".json" if meta["format"] == "files" else ".npz"
    missing = [s for s in ("train", "val") if not (folder / f"{s}{suffix}").is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {', '.join(s + suffix for s in missing)}: run dvc repro -f prepare")
    if meta["format"] == "files" and not Path(meta["root"]).is_dir():
        raise ConfigError(
            f"the prepared image folder {meta['root']} no longer exists: fix data.path and run dvc repro -f prepare"
        )
    if batch_size > meta["counts"]["train"]:  # drop_last would leave no training batch at all
        raise ConfigError(f"{key}={batch_size} exceeds the {meta['counts']['train']} training images")
    return meta
