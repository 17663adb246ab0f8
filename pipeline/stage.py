"""What every stage entry point shares: ``--params``, config validation before any work, exit 2 on
bad configuration with one clear message, and writes that are never seen half done."""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import ConfigError, load_config


class StageError(Exception):
    """A stage cannot run with what is on disk or in the tracking store; the message says why."""


def run_stage(description, body, add_arguments=None, argv=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params)
        body(cfg, args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


@contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary sibling folder; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV; the columns are every key in first-seen order (rows may differ in their keys)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
