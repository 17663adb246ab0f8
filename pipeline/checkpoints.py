"""The train stage's checkpoints: ``best.ckpt`` and ``last.ckpt`` in a seed's folder (a local path or an
fsspec URL), each replaced whole every epoch, so a run resumes from ``last.ckpt`` after any interruption."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """A local checkpoint is written beside its target, flushed to disk and renamed over it: a kill, or
    a node's crash before SLURM requeues the job (``--requeue``), leaves the old checkpoint or the new
    one, whole.

    Lightning's save (``lightning.fabric.utilities.cloud_io._atomic_save``) writes through an fsspec
    transaction whose local file is made in the system temp folder (``LocalFileOpener._open``) and
    moved over the target on commit: where that folder is on another filesystem than the checkpoints
    (a node's own /tmp, checkpoints on shared storage) the move is a copy into the target, which a kill
    cuts short, and nothing is fsynced. An object store (``s3://``) replaces an object whole:
    Lightning's save is kept for URLs.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        fs, local = url_to_fs(str(path))
        if not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")  # one writer (global rank 0); a killed write's is overwritten
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def checkpoint_callbacks(ckpt_dir: str, monitor: str) -> list[ModelCheckpoint]:
    """``best.ckpt`` by ``monitor`` (higher is better: top-1, mAP) and ``last.ckpt``."""
    return [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max", save_top_k=1),
        # every epoch, replaced: Lightning's save_last follows the monitored checkpoint, so it would
        # stay at the last improving epoch, and a resume would repeat the epochs after it
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False),
    ]


def describe(last: str) -> str:
    """What a stopped run leaves to resume from, for its error message."""
    fs, path = url_to_fs(last)
    if not fs.exists(path):
        return "no checkpoint had been written yet"
    with fs.open(path, "rb") as f:
        epoch = torch.load(f, map_location="cpu", weights_only=True)["epoch"]
    return f"the last good checkpoint, {last} (end of epoch {epoch}), is intact"
