"""What every stage entry point shares: ``--params``, config validation before any work, exit 2 on
bad configuration with one clear message, SIGTERM handled like Ctrl-C (exit 130 after a clean
stop), and writes that are never seen half done."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline import console
from pipeline.config import ConfigError, load_config


class StageError(Exception):
    """A stage cannot run with what is on disk or in the tracking store; the message says why."""


def sigterm_as_ctrl_c():
    """A scheduler's SIGTERM takes the same clean path as Ctrl-C: Lightning and Ray Tune stop
    gracefully on SIGINT, MLflow runs are marked KILLED, temporary outputs are removed. Returns the
    handler it replaced (``ray.init`` installs its own, so the sweep calls this again after it)."""
    return signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))


def run_stage(description, body, stage, add_arguments=None, argv=None):
    """Parse ``--params``, send the libraries' output to the stage's log file (``pipeline.console``),
    validate the whole file (every model built, see ``pipeline.config.validate``), run ``body(cfg,
    args)`` and turn the known failures into one message and an exit status. ``stage`` names the log:
    a string, or a function of the parsed arguments (``train@VARIANT``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    console.to_log_file(stage(args) if callable(stage) else stage)
    previous = sigterm_as_ctrl_c()
    try:
        cfg = load_config(args.params)
        body(cfg, args)
    except ConfigError as err:
        console.say(f"error: {err}", error=True)
        sys.exit(2)
    except StageError as err:
        console.say(f"error: {err}", error=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.say("interrupted: nothing half-written was kept; run the stage again to resume", error=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary sibling folder; it replaces ``target`` only if the block succeeds.

    The old folder is moved aside, not deleted, until the new one is in place; leftovers of a
    killed earlier attempt (``.NAME.*`` siblings) are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        old = target.with_name(f"{tmp.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path, fix: str):
    """A JSON file this pipeline wrote; a file cut short or edited by hand is a ``StageError`` that
    names it and says ``fix`` (delete it, re-run the stage), not a decoder traceback."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"{path} is corrupt ({err}): {fix}") from None


def atomic_write_text(path: str | Path, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:  # on disk before the rename: a resume record must survive a node's crash
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(url: str, text: str):
    """``atomic_write_text`` for a local path; one whole-object write for an fsspec URL (``s3://``)."""
    fs, path = url_to_fs(str(url))
    if isinstance(fs, LocalFileSystem):
        atomic_write_text(path, text)
    else:
        fs.pipe_file(path, text.encode())


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV; the columns are every key in first-seen order (rows may differ in their keys)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
