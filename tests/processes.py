"""Processes a test starts as a user or a cluster would: each in its own session, with a deadline on
every wait, and killed with all its descendants when the test ends (the ``launched`` fixture)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """Processes started in their own sessions, killed with every descendant at the end."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, cwd, env=None, **kwargs):
        full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
        full_env.update({"OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})})
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            **kwargs,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc):
        try:
            tree = [proc.pid and psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)


@pytest.fixture
def launched():
    procs = Launched()
    yield procs
    procs.close()


def finish(proc, timeout) -> str:
    """The process's output once it has exited; a process still running at the deadline fails the test."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args} still running after {timeout} s: a hang")
    return out


def wait_for(condition, procs, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        for proc in procs:
            assert proc.poll() is None, (
                f"{proc.args} exited {proc.returncode} before {what}:\n{proc.communicate()[0][-3000:]}"
            )
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)
