"""What a stage shows in the terminal, and the log file that keeps everything.

The terminal gets the stage's own lines (what it decided: resume or start, where its runs go; and its
result) and one progress bar. Everything the libraries say through Python's logging or warnings
(Lightning's tips and device lines, MLflow's notices, Ray's start-up lines, deprecation warnings) goes
to ``logs/STAGE.log`` instead, with the stage's own lines, each attempt appended after the last.
"""

from __future__ import annotations

import io
import logging
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from tqdm import tqdm

from pipeline.locations import in_project

LOGS = "logs"
log = logging.getLogger("pipeline")


def log_file(stage: str) -> Path:
    """The stage's log, in the project folder (also from a ``dvc exp run`` copy)."""
    return Path(in_project(f"{LOGS}/{stage}.log"))


def to_log_file(stage: str) -> Path:
    """Send logging and warnings to the stage's log file, none to the terminal."""
    path = log_file(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")  # appends: a resumed stage keeps the attempts before it
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    quiet_libraries()
    log.info("%s: %s", stage, " ".join(sys.argv))
    return path


def quiet_libraries():
    """Loggers that write to the terminal through handlers of their own (Lightning's, MLflow's, Ray's,
    set up when they are imported or started) pass their records to the log file instead."""
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.handlers:
            logger.handlers = [h for h in logger.handlers if isinstance(h, (logging.FileHandler, logging.NullHandler))]
            logger.propagate = True


def say(message: str, error: bool = False):
    """A line for the person at the terminal (above the progress bar), and for the log."""
    tqdm.write(message, file=sys.stderr if error else sys.stdout)
    log.log(logging.ERROR if error else logging.INFO, message)


def progress_bar(description: str, total: float | None = None, unit: str = "step", enabled: bool = True) -> tqdm:
    """The stage's one bar, on a terminal only (a log or CI output gets the stage's lines alone)."""
    return tqdm(total=total, desc=description, unit=unit, disable=None if enabled else True, dynamic_ncols=True)


class _LogLines(io.TextIOBase):
    """A text stream whose lines become log records (``stdout`` logger)."""

    def __init__(self):
        self.pending = ""

    def writable(self):
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            logging.getLogger("stdout").info(line.rstrip())
        return len(text)

    def flush(self):
        if self.pending:
            self.write("\n")


@contextmanager
def stdout_to_log():
    """What libraries print to stdout inside the block (Ray Tune's experiment tables and paths, Lightning's
    model summary) goes to the log file; the stage's bar writes to stderr and its lines are said after."""
    stream = _LogLines()
    try:
        with redirect_stdout(stream):
            yield
    finally:
        stream.flush()
