"""Fixtures for pipeline tests: a work folder with a tiny params.yaml and prepared MNIST data, and a
git + DVC project as a user's clone is."""

import shutil

# Lightning's loggers bind sys.stderr when it is first imported: import it before any test captures
# stderr, or later tests log to that test's captured stream, closed by then ("--- Logging error ---").
import lightning.pytorch  # noqa: F401
import pytest

from tests.helpers import REPO, run_in_project, write_params
from tests.processes import launched  # noqa: F401  (a fixture for every pipeline test)


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
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        proc = run_in_project(*cmd, cwd=folder)
        assert proc.returncode == 0, proc.stderr
    return folder
