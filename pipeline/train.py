"""Stage ``train``: train one variant once per seed with Lightning, track each run in MLflow, resume if interrupted.

``python -m pipeline.train --variant NAME``, the same command under Lightning's own launcher
(``train.devices: N``), ``torchrun`` or SLURM's ``srun``. The seeds (``train.seeds``) train one after
the other, one MLflow run each. Checkpoints go to ``train.checkpoint_dir/NAME/seed-S/`` every epoch;
``run.json`` there records the MLflow run and a fingerprint of that run's configuration. Global rank
0 alone decides, and tells the other ranks: a re-run with the same fingerprint resumes from
``last.ckpt`` into the same MLflow run (seeds already finished in this attempt are not retrained); a
changed configuration starts afresh. Before that, every rank must read back a token rank 0 wrote
into the checkpoint folder, or all stop with an error naming it. Each epoch's shuffling and
augmentation are seeded by (seed, epoch), so a resumed run ends with the same weights and metrics
as an uninterrupted one. Ctrl-C or SIGTERM to any rank stops every rank at the same step and marks
the MLflow run KILLED (exit 130); a NaN/inf loss stops training (run FAILED) before it touches the
weights or the checkpoints. Only rank 0 talks to MLflow. The stage writes ``metrics/NAME.json``
(what DVC tracks: each seed's score, top-1 or a detector's mAP, and their mean with its 95% interval) last.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
from fsspec.core import url_to_fs
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient

from pipeline import preflight
from pipeline.checkpoints import AtomicCheckpointIO, checkpoint_callbacks, describe
from pipeline.config import Config, ConfigError
from pipeline.console import log_file, progress_bar, say, stdout_to_log
from pipeline.distributed import World, wait_for_launcher
from pipeline.locations import redact
from pipeline.module import NonFiniteLoss, Run, StopAtBatchEnd, build_run, build_trainer
from pipeline.runstate import RunRecord
from pipeline.stage import StageError, atomic_write_text, run_stage
from pipeline.stats import estimate
from pipeline.tracking import count_metrics, experiment_id, log_model, start_training_run, tracking_uri

METRICS = Path("metrics")
# The seed's checkpoint folder holds its resume record (run.json) before the first checkpoint, and
# anything older was removed by the resume decision: Lightning's warning about a non-empty folder is noise.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class Throughput(pl.Callback):
    """Training images per second over each epoch, all processes together, data loading included."""

    def __init__(self):
        self.rates = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.images, self.start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[0]) * trainer.world_size  # a tensor, or a detection batch's list
        self.end = time.perf_counter()  # epoch end hooks run after validation and checkpointing

    def on_train_epoch_end(self, trainer, pl_module):
        rate = self.images / (self.end - self.start)
        self.rates.append(rate)
        pl_module.log("train_images_per_s", rate, rank_zero_only=True)


class EpochStepLogger(MLFlowLogger):
    """Epoch metrics stepped by epochs completed (1, 2, ...), as sweep trials are: one x axis for
    both in the MLflow UI, not Lightning's global step."""

    def log_metrics(self, metrics, step=None):
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        super().log_metrics(metrics, step=step if epoch is None else int(epoch) + 1)


def checkpoint_dir(cfg: Config, variant: str, seed: int) -> str:
    return f"{cfg.train.checkpoint_dir.rstrip('/')}/{variant}/seed-{seed}"


class StageProgress(ProgressBar):
    """The stage's one bar over every seed's training steps, in place of Lightning's bar per epoch (and
    its model summary, which then goes to the log). A resumed seed starts the bar where it stopped."""

    def __init__(self, bar, seeds: int, index: int):
        super().__init__()
        self.bar, self.seeds, self.index = bar, seeds, index

    def disable(self):
        self.bar.disable = True

    def on_train_start(self, trainer, pl_module):
        per_seed = trainer.num_training_batches * trainer.max_epochs
        self.bar.total = per_seed * self.seeds
        self.bar.n = self.index * per_seed + trainer.current_epoch * trainer.num_training_batches
        self.bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        shown = {
            k: f"{float(v):.3f}" for k, v in trainer.progress_bar_metrics.items() if k.startswith(("val_", "train_"))
        }
        self.bar.set_postfix(epoch=f"{trainer.current_epoch + 1}/{trainer.max_epochs}", **shown, refresh=False)
        self.bar.update(1)


def _start_or_resume_run(cfg: Config, variant: str, seed: int, ckpt_dir: str, run: Run) -> dict:
    """Rank 0: the result of this configuration's run if it finished before the stage was interrupted
    (``done``); else continue its interrupted run if its record and its MLflow run are still there;
    else discard the old checkpoints and create a run."""
    client = MlflowClient(tracking_uri(cfg))
    exp_id = experiment_id(client, cfg)
    record = RunRecord(f"{ckpt_dir}/run.json")
    fs, path = url_to_fs(ckpt_dir)
    fingerprint = cfg.fingerprint(variant, seed)
    done = record.unreported(fingerprint, client, exp_id)
    if done:
        return {"done": done}

    def start():
        if fs.exists(path):  # also what a SLURM requeue or an older attempt left there
            fs.rm(path, recursive=True)
        tags = {
            "sasa.kind": "train",
            "sasa.variant": variant,
            "dvc.stage": f"train@{variant}",
            "sasa.fingerprint": fingerprint,
        }
        run_id = start_training_run(
            client,
            exp_id,
            cfg,
            f"{variant} seed {seed}",
            tags,
            cfg.models.resolved(variant),
            cfg.train,
            seed,
            run.module.model,
            run.data.prepared,
        )
        for name, value in count_metrics(run.counts).items():
            client.log_metric(run_id, name, value)
        fs.makedirs(path, exist_ok=True)
        return {"run_id": run_id}

    state, resumed = record.resume_or_start(fingerprint, client, exp_id, start)
    return {"run_id": state["run_id"], "resume": resumed and fs.exists(f"{path}/last.ckpt")}


def _plugins() -> list:
    """Checkpoints replaced whole (``AtomicCheckpointIO``). Under SLURM, Lightning's auto-requeue would
    save ``hpc_ckpt_*.ckpt`` on SIGUSR1 and restore it whenever no checkpoint is given, so a fresh
    attempt could continue an old one. Resume is the stage's own decision (``run.json``): requeueing
    is the job script's (``scripts/cluster/train.sbatch``)."""
    return [AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])]


def train(cfg: Config, variant: str) -> dict | None:
    """Every seed of the variant in turn; rank 0 returns (and writes) the summary."""
    if variant not in cfg.models.variants:
        raise ConfigError(f"--variant {variant!r} is not in models.variants; defined: {', '.join(cfg.models.variants)}")
    preflight.devices(cfg.train)
    world, runs, bar = None, [], None
    for index, seed in enumerate(cfg.train.seeds):
        run = build_run(cfg.data, cfg.models.resolved(variant), cfg.train, seed=seed)  # checks data/prepared first
        if world is None:
            world = World.launch(cfg.train)
            world.on_zero(lambda: preflight.tracking(cfg))  # the other nodes may have no route to the tracking server
            if world.is_zero:
                say(
                    f"train@{variant}: {len(cfg.train.seeds)} seed(s) x {cfg.train.epochs} epochs on {world.size} "
                    f"process(es); runs in MLflow {redact(tracking_uri(cfg))} (experiment {cfg.mlflow.experiment!r}), "
                    f"checkpoints in {checkpoint_dir(cfg, variant, '*')}, full log in {log_file(f'train@{variant}')}"
                )
            bar = progress_bar(f"train@{variant}", enabled=cfg.train.progress_bar and world.is_zero)
        progress = StageProgress(bar, len(cfg.train.seeds), index) if cfg.train.progress_bar else None
        runs.append(_train_seed(cfg, variant, seed, run, world, progress))
    bar.close()
    if not world.is_zero:
        return None
    return _summarise(cfg, variant, runs)


def _train_seed(cfg: Config, variant: str, seed: int, run: Run, world: World, progress) -> dict | None:
    ckpt_dir = checkpoint_dir(cfg, variant, seed)
    world.check_shared(ckpt_dir, key="train.checkpoint_dir")
    decision = world.on_zero(lambda: _start_or_resume_run(cfg, variant, seed, ckpt_dir, run))
    if "done" in decision:
        say(
            f"train@{variant} seed {seed}: finished before the stage was interrupted "
            f"(MLflow run {decision['done']['run_id']})"
        )
        return decision["done"]
    run_id = decision["run_id"]
    last = f"{ckpt_dir}/last.ckpt"
    action = f"resuming from {last}" if decision["resume"] else "starting afresh"
    rank = f"rank {world.rank} of {world.size}, " if world.size > 1 else ""
    say(f"train@{variant} seed {seed}: {rank}MLflow run {run_id}: {action}")

    throughput = Throughput()
    callbacks = [*checkpoint_callbacks(ckpt_dir, cfg.data.task.monitor), throughput, StopAtBatchEnd()]
    callbacks += [progress] if progress else []
    logger = (
        EpochStepLogger(experiment_name=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg), run_id=run_id)
        if world.is_zero
        else False
    )
    trainer = build_trainer(
        cfg.train, logger=logger, callbacks=callbacks, default_root_dir=ckpt_dir, plugins=_plugins()
    )
    try:
        with stdout_to_log():
            trainer.fit(
                run.module, datamodule=run.data, ckpt_path=last if decision["resume"] else None, weights_only=True
            )
    except NonFiniteLoss as err:  # Lightning has marked the run FAILED
        raise StageError(
            f"{err}. Training stopped before that step; {describe(last)}. Lower train.lr or check the data."
        ) from None
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C (and so SIGTERM) into SystemExit
        if world.is_zero:
            MlflowClient(tracking_uri(cfg)).set_terminated(run_id, "KILLED")
        world.barrier()  # every rank stopped at the same step; none leaves before the run is marked
        raise KeyboardInterrupt from None
    if not world.is_zero:
        return None
    return _finish(cfg, variant, seed, run_id, trainer, throughput, run, ckpt_dir)


def _finish(cfg, variant, seed, run_id, trainer, throughput, run: Run, ckpt_dir) -> dict:
    """Rank 0, one seed: the final metrics, best checkpoint and trained model into its MLflow run,
    its record finished."""
    client, task = MlflowClient(tracking_uri(cfg)), cfg.data.task
    history = client.get_run(run_id).data.metrics
    results = {
        k: float(trainer.callback_metrics.get(f"val_{k}", history.get(f"val_{k}", float("nan")))) for k in task.results
    }
    rates = throughput.rates or [m.value for m in client.get_metric_history(run_id, "train_images_per_s")]
    results["throughput_images_per_s"] = statistics.median(rates) if rates else float("nan")
    for name, value in results.items():
        client.log_metric(run_id, name, value, step=trainer.current_epoch)
    fs, best = url_to_fs(f"{ckpt_dir}/best.ckpt")
    if fs.exists(best):
        with tempfile.TemporaryDirectory() as tmp:  # MLflow uploads local files
            fs.get(best, f"{tmp}/best.ckpt")
            client.log_artifact(run_id, f"{tmp}/best.ckpt", artifact_path="checkpoints")
    # one normalised validation image; a detector takes a list of images, which no MLflow signature describes
    example = run.data.val_set[0][0].unsqueeze(0).numpy() if task.name == "classification" else None
    log_model(tracking_uri(cfg), run_id, run.module.model, example)
    counts = run.counts
    result = {"seed": seed, "run_id": run_id, **results, **counts.as_dict(), "epochs": trainer.current_epoch}
    RunRecord(f"{ckpt_dir}/run.json").finish(result)
    say(
        f"{variant} seed {seed}: {task.label} {100 * results[task.score]:.2f}, {counts.flops / 1e6:.1f} MFLOPs, "
        f"{counts.params / 1e6:.3f} M params"
    )
    return result


def _summarise(cfg: Config, variant: str, runs: list[dict]) -> dict:
    """``metrics/VARIANT.json``: each seed's run, and the task's score (top-1, or a detector's mAP) as
    mean and 95% interval over the seeds, its other results as means."""
    task, first = cfg.data.task, runs[0]
    score = estimate([r[task.score] for r in runs])
    summary = {
        "variant": variant,
        task.score: score.mean,
        f"{task.score}_ci95": score.half_width,
        "n": score.n,
        **{k: statistics.mean(r[k] for r in runs) for k in task.results[1:]},
        "throughput_images_per_s": statistics.median(r["throughput_images_per_s"] for r in runs),
        **{k: first[k] for k in ("params", "macs", "flops", "epochs")},
        "seeds": {str(r["seed"]): {"run_id": r["run_id"], **{k: r[k] for k in task.results}} for r in runs},
    }
    atomic_write_text(METRICS / f"{variant}.json", json.dumps(summary, indent=2))
    for r in runs:  # a later attempt of the stage retrains them
        RunRecord(f"{checkpoint_dir(cfg, variant, r['seed'])}/run.json").mark_reported()
    say(
        f"{variant}: {task.label} {estimate([100 * r[task.score] for r in runs])} "
        f"over seeds {', '.join(str(r['seed']) for r in runs)}"
    )
    return summary


def main(argv=None):
    try:
        run_stage(
            __doc__.splitlines()[0],
            lambda cfg, args: train(cfg, args.variant),
            lambda args: f"train@{args.variant}",
            add_arguments=lambda p: p.add_argument("--variant", required=True, help="a key of models.variants"),
            argv=argv,
        )
    except SystemExit as stop:
        if stop.code:
            wait_for_launcher()
        raise


if __name__ == "__main__":
    main()
