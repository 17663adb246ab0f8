"""Where the project's stores live, and how their addresses may be shown.

``dvc exp run --temp`` and queued experiments (``dvc queue start``) run in a copy of the project
under ``ROOT/.dvc/tmp/exps/``, deleted when they end: relative stores (``sqlite:///mlflow.db``,
``sweep/ray``) resolve to the user's project folder, not to that copy, so every experiment's runs
land in one place. A URI's credentials (``https://user:token@host``, ``postgresql://user:pw@host``)
are never printed or written: messages and reports show ``redact(uri)``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

EXPERIMENT_COPIES = (".dvc", "tmp", "exps")  # dvc.repo.experiments: ROOT/.dvc/tmp/exps/tmpXXXX
SECRET_QUERY_KEYS = re.compile(r"pass|token|secret|key", re.IGNORECASE)


def project_root() -> Path:
    """The user's project folder: the DVC root of this stage (``DVC_ROOT``, else the current folder),
    or, inside a temporary experiment copy, the project that copy was made from."""
    here = Path(os.environ.get("DVC_ROOT") or ".").resolve()
    if here.parent.parts[-len(EXPERIMENT_COPIES) :] == EXPERIMENT_COPIES:
        return here.parents[len(EXPERIMENT_COPIES)]
    return here


def in_project(path: str) -> str:
    """A relative local path under the project root; absolute paths and URLs (``s3://``) as given."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str(project_root() / path)


def resolve_tracking_uri(uri: str) -> str:
    """A relative SQLite file (``sqlite:///mlflow.db``) under the project root; other URIs as given."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and ":memory:" not in uri:
        return f"sqlite:///{project_root() / uri.removeprefix('sqlite:///')}"
    return uri


def redact(uri: str) -> str:
    """``uri`` fit to print: user and password replaced by ``***``, and so are query values named
    like secrets (``?password=...``, ``?token=...``)."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if "@" not in parts.netloc and not any(SECRET_QUERY_KEYS.search(k) for k, _ in pairs):
        return uri
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = urlencode([(k, "***" if SECRET_QUERY_KEYS.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
