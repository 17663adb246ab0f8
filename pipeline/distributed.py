"""The processes of one training run, agreeing on what they share before Lightning trains them.

Lightning's Trainer sets up its process group inside ``fit``: too late for what every rank must
know before it (which checkpoint to resume, whether the checkpoint folder is shared). ``World``
starts the processes as the Trainer would (Lightning Fabric's launcher re-runs the script for
``devices: N``; under ``torchrun`` or ``srun`` the launcher has already started them) and sets
up the process group, which the Trainer then reuses. Global rank 0 decides; the others follow
what it broadcasts, and an error on rank 0 reaches every rank, so no rank waits for a peer that
has given up.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import torch.distributed as dist
from fsspec.core import url_to_fs
from lightning.fabric import Fabric

from pipeline.config import ConfigError, TrainConfig
from pipeline.stage import StageError

# Set by the process that launches the others on its node (Lightning's launcher copies the
# environment into them), so they can tell that their parent watches their exit codes.
LAUNCHER_PID = "SASA_LAUNCHER_PID"


class World:
    def __init__(self, fabric: Fabric):
        self.fabric = fabric

    @classmethod
    def launch(cls, train: TrainConfig) -> World:
        """Start (or join) the run's processes and their process group, configured like the Trainer."""
        if "LOCAL_RANK" not in os.environ:  # not itself started by a launcher: it may become one
            os.environ[LAUNCHER_PID] = str(os.getpid())
        fabric = Fabric(
            accelerator=train.accelerator, devices=train.devices, num_nodes=train.num_nodes, strategy=train.strategy
        )
        fabric.launch()
        return cls(fabric)

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def size(self) -> int:
        return self.fabric.world_size

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def on_zero(self, fn):
        """``fn()`` on global rank 0; every rank returns its result, or raises its error."""
        outcome = None
        if self.is_zero:
            try:
                outcome = ("ok", fn())
            except (ConfigError, StageError) as err:
                outcome = (type(err).__name__, str(err))
            except Exception as err:
                outcome = ("StageError", f"rank 0 failed: {type(err).__name__}: {err}")
        kind, value = self.fabric.broadcast(outcome, src=0) if self.size > 1 else outcome
        if kind == "ok":
            return value
        raise (ConfigError if kind == "ConfigError" else StageError)(value)

    def check_shared(self, folder: str, key: str):
        """Every rank reads back a token rank 0 wrote into ``folder``: checkpoints are written by
        rank 0 and loaded by every rank, so the folder must be the same one on every node."""
        if self.size == 1:
            return
        fs, path = url_to_fs(folder)
        token_path = f"{path.rstrip('/')}/.shared-check"

        def write_token():
            fs.makedirs(path, exist_ok=True)
            token = uuid.uuid4().hex
            fs.pipe_file(token_path, token.encode())
            return token

        token = self.on_zero(write_token)
        try:
            fs.invalidate_cache()
            seen = fs.cat_file(token_path).decode() == token
        except (OSError, ValueError):
            seen = False
        views = [None] * self.size
        dist.all_gather_object(views, (seen, socket.gethostname()))
        if self.is_zero:
            fs.rm(token_path)
        blind = [f"rank {rank} on {host}" for rank, (ok, host) in enumerate(views) if not ok]
        if blind:
            raise ConfigError(
                f"{key}: {folder} is not shared: {', '.join(blind)} cannot read what rank 0 wrote there. Rank 0 writes "
                f"the checkpoints and every rank loads them to resume, so every node must see the same folder: put the "
                f"project on shared storage, or set {key} to a shared path or an fsspec URL (s3://BUCKET/checkpoints)"
            )

    def barrier(self):
        """Wait for every rank; a rank that has died already is no reason to wait (gloo says so at once)."""
        if self.size > 1:
            try:
                self.fabric.barrier()
            except RuntimeError:
                pass


def wait_for_launcher(timeout_s: float = 30.0):
    """In a process started by Lightning's launcher: let the launcher exit first. Its watchdog
    SIGKILLs every process, itself included, as soon as one of its children exits non-zero, which
    would cut short rank 0's clean stop (the MLflow run marked KILLED, exit 130)."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or str(os.getpid()) == launcher or str(os.getppid()) != launcher:
        return
    deadline = time.monotonic() + timeout_s
    while os.getppid() == int(launcher) and time.monotonic() < deadline:
        time.sleep(0.05)
