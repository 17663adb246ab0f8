"""Fixtures for pipeline tests: a work folder with a tiny params.yaml and prepared MNIST data."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"source": "mnist5k", "num_workers": 0, "hflip": False},
    "models": {
        "common": {"model": "resnet26", "width": 0.125, "heads": 2, "kernel_size": 3, "small_input": True},
        "variants": {"conv": {"form": "conv"}},
    },
    "train": {"epochs": 2, "batch_size": 32, "limit_train_batches": 4, "limit_val_batches": 2, "progress_bar": False, "accelerator": "cpu"},
    "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "test"},
    "report": {"label_points": True},
    "sweep": {"name": "tiny", "base": "conv", "space": {"kernel_size": [3]}, "train": {"epochs": 1}},
}


def merged(base, overrides):
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if value and isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_params(folder: Path, overrides=None):
    params = merged(TINY, overrides or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run_module(module, *args, cwd, timeout=600, env=None):
    """Run a stage as a user does: a fresh ``python -m`` process in the work folder."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def prepared_mnist(tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.prepare import prepare

    folder = tmp_path_factory.mktemp("prepared")
    write_params(folder)
    prepare(load_config(folder / "params.yaml"), out=folder / "data" / "prepared")
    return folder / "data" / "prepared"


@pytest.fixture
def workdir(tmp_path, prepared_mnist, monkeypatch):
    """A folder with the tiny params.yaml and prepared mnist5k, as the current directory."""
    shutil.copytree(prepared_mnist, tmp_path / "data" / "prepared")
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
