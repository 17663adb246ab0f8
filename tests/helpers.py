"""What tests share besides fixtures: the tiny params, writing them, running stages and commands as a
user does, and reading dvc.yaml's tracked keys."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)

TINY = {
    "data": {"source": "mnist5k", "num_workers": 0, "hflip": False},
    "models": {
        "common": {"model": "resnet26", "width": 0.125, "heads": 2, "kernel_size": 3, "small_input": True},
        "variants": {"conv": {"form": "conv"}},
    },
    "train": {
        "epochs": 2,
        "batch_size": 32,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "progress_bar": False,
        "accelerator": "cpu",
    },
    "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "test"},
    "report": {"label_points": True},
    "sweep": {"name": "tiny", "base": "conv", "space": {"kernel_size": [3]}, "train": {"epochs": 1}},
}


def merged(base, overrides):
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = (
            merged(out[key], value) if value and isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
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
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_in_project(*cmd, cwd, timeout=900):
    """A command as ``make run`` runs it: the environment's executables first on PATH (stage commands
    call ``python``), no tracking URI from outside."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def leaves(params: dict, prefix="") -> set[str]:
    """Every key path of a params mapping (``train.lr``); architectures count as one value each."""
    out = set()
    for key, value in params.items():
        name = f"{prefix}{key}"
        whole = name == "models.common" or name.startswith("models.variants.")
        out |= leaves(value, f"{name}.") if isinstance(value, dict) and value and not whole else {name}
    return out


def stage_params() -> dict[str, set[str]]:
    """The params each stage of dvc.yaml tracks."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {
        "prepare": set(stages["prepare"]["params"]),
        "train": set(stages["train"]["do"]["params"]),
        "sweep": set(stages["sweep"]["params"]),
        "report": set(stages["report"]["params"]),
    }


def within(key: str, entry: str) -> bool:
    """Whether ``key`` is the tracked ``entry`` or lies below it."""
    return key == entry or key.startswith(f"{entry}.")


def run_in_terminal(*cmd, cwd, env=None, timeout=600, columns=120) -> tuple[int, str]:
    """A command as a person at a terminal sees it (a pseudo-terminal of ``columns`` columns, so progress
    bars draw): its exit status and everything it wrote to the screen, stdout and stderr together."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env["PATH"] = BIN + os.pathsep + full_env["PATH"]
    full_env.update(env or {})
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the terminal closed: every process holding it has exited
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            raise TimeoutError(f"{cmd} ran past {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def screen_lines(output: str) -> list[str]:
    """What stays on the screen of each line: its last text after a carriage return (a bar redraws)."""
    lines = []
    for line in output.replace("\r\n", "\n").split("\n"):
        drawn = [part for part in line.split("\r") if part.strip()]
        lines += drawn[-1:]
    return lines


def stage_log(folder: Path, stage: str) -> str:
    """What a stage run in ``folder`` wrote to its log (``logs/STAGE.log``: the libraries' lines), every attempt."""
    path = folder / "logs" / f"{stage}.log"
    return path.read_text() if path.is_file() else ""
