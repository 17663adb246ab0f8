"""Where stores live (also from a temporary DVC experiment's copy) and URIs shown without credentials."""

import pytest

from pipeline.locations import in_project, project_root, redact, resolve_tracking_uri
from tests.helpers import TINY, merged, run_module, write_params


def test_a_temporary_experiment_copy_resolves_to_the_project_it_was_made_from(tmp_path, monkeypatch):
    copy = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert project_root() == tmp_path / "project"
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/project/mlflow.db"
    assert in_project("sweep/ray") == f"{tmp_path}/project/sweep/ray"

    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))  # a workspace run: its own folder
    assert project_root() == tmp_path / "project"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(tmp_path)  # outside DVC: the current folder
    assert project_root() == tmp_path


@pytest.mark.parametrize(
    "given",
    [
        "sqlite:////data/mlflow.db",
        "http://127.0.0.1:5000",
        "postgresql://db/mlflow",
        "s3://bucket/sweeps",
        "/shared/sweeps",
    ],
)
def test_absolute_paths_and_remote_uris_stay_as_given(given, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / ".dvc" / "tmp" / "exps" / "tmp1"))
    assert resolve_tracking_uri(given) == given
    if not given.startswith(("sqlite", "http", "postgresql")):
        assert in_project(given) == given


@pytest.mark.parametrize(
    "uri,shown",
    [
        ("https://alice:s3cret@mlflow.example:5000/path", "https://***@mlflow.example:5000/path"),
        ("https://TOKEN@mlflow.example", "https://***@mlflow.example"),
        (
            "postgresql+psycopg2://alice:s3cret@db:5432/mlflow?sslmode=require",
            "postgresql+psycopg2://***@db:5432/mlflow?sslmode=require",
        ),
        ("mysql://db/mlflow?user=alice&password=s3cret", "mysql://db/mlflow?user=alice&password=***"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_credentials_in_a_uri_are_never_shown(uri, shown):
    assert redact(uri) == shown


@pytest.mark.slow
def test_a_database_without_its_driver_stops_the_stage_before_any_work_without_showing_the_password(workdir):
    write_params(workdir, {"mlflow": {"tracking_uri": "postgresql+nosuchdriver://alice:s3cret@127.0.0.1:9/mlflow"}})
    proc = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "mlflow.tracking_uri=postgresql+nosuchdriver://***@127.0.0.1:9/mlflow: SQLAlchemy has no "
        "'postgresql+nosuchdriver' dialect; use one of postgresql://, mysql://, mssql://" in proc.stderr
    )
    assert "s3cret" not in proc.stdout + proc.stderr
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics").exists()


@pytest.mark.parametrize(
    "uri,module,package",
    [
        ("postgresql://bob:pw@db/mlflow", "psycopg", "psycopg[binary]"),  # SQLAlchemy 2.1's default for postgresql
        ("postgresql+psycopg2://db/mlflow", "psycopg2", "psycopg2-binary"),
        ("mysql+pymysql://db/mlflow", "pymysql", "pymysql"),
        ("mysql://db/mlflow", "MySQLdb", "mysqlclient"),
        ("mssql+pyodbc://db/mlflow", "pyodbc", "pyodbc"),
    ],
)
def test_a_missing_database_driver_names_the_package_that_provides_it(uri, module, package, monkeypatch):
    import importlib.util
    import re

    from pipeline import preflight
    from pipeline.config import ConfigError, validate

    if importlib.util.find_spec(module):
        pytest.skip(f"{module} is installed here")
    monkeypatch.delenv(
        "MLFLOW_TRACKING_URI", raising=False
    )  # it would win over the params (mlflow.set_tracking_uri sets it)
    cfg = validate(merged(TINY, {"mlflow": {"tracking_uri": uri}}), "test", builds=())
    with pytest.raises(
        ConfigError, match=rf"is not installed \(No module named '{module}'\).*pip install '{re.escape(package)}'"
    ):
        preflight.tracking(cfg)
