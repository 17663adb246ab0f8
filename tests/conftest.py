"""Fixtures for pipeline tests: a work folder with a tiny params.yaml and prepared MNIST data."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Lightning's loggers bind sys.stderr when it is first imported: import it before any test captures
# stderr, or later tests log to that test's captured stream, closed by then ("--- Logging error ---").
import lightning.pytorch  # noqa: F401
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)

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
    """TINY with ``overrides``, every key spelled out as in a real params.yaml (DVC tracks keys one by
    one); params that fail validation (tests of bad input) are written as given."""
    from pipeline.config import ConfigError, validate

    params = merged(TINY, overrides or {})
    try:
        params = validate(params, "test params").params_file()
    except ConfigError:
        pass
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


def run_in_project(*cmd, cwd, timeout=900):
    """A command as ``make run`` runs it: the environment's executables first on PATH (stage commands
    call ``python``), no tracking URI from outside."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def dvc_project(tmp_path):
    """A git + DVC repository with the project's code and pipeline and the tiny params.yaml, as a
    user's clone is (in its own folder below tmp_path)."""
    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, folder / name)
    for pkg in ("sasa", "pipeline"):
        shutil.copytree(REPO / pkg, folder / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(folder)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        proc = run_in_project(*cmd, cwd=folder)
        assert proc.returncode == 0, proc.stderr
    return folder
