"""Stage ``sweep``: a Ray Tune search over the spatial extent, the stem, ... of one variant.

``python -m pipeline.sweep``. Joins the Ray cluster at ``RAY_ADDRESS`` / ``sweep.address`` or starts
a local runtime. Every trial runs the train stage's ``Classifier`` and ``PreparedDataModule`` in a
Lightning Trainer, reports each epoch to Tune (ASHA may stop it there) with a checkpoint, so a failed
trial is retried from its last epoch. The driver logs each trial as an MLflow run nested under one
parent run per sweep: trials never touch the tracking store, so a SQLite file on the head node
serves a whole cluster. A re-run after the driver died restores the Tune experiment and runs only
the unfinished trials; Ctrl-C or SIGTERM stops it gracefully and marks its MLflow runs KILLED.
``sweep/results.csv`` (one row per trial) is written last.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import ray
import ray.train
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

import sasa
from pipeline import preflight
from pipeline.config import ARCH_KEYS, Config, ConfigError, SweepConfig
from pipeline.data import PreparedDataModule
from pipeline.module import Classifier, build_trainer
from pipeline.stage import StageError, atomic_write_text, csv_text, run_stage, sigterm_as_ctrl_c
from pipeline.tracking import experiment_id, flatten, run_in_experiment, source_tags, tracking_uri

SWEEP = Path("sweep")
STATE = SWEEP / "state.json"
RESULTS = SWEEP / "results.csv"
PREPARED = Path("data/prepared")
CHECKPOINT = "last.ckpt"
# What a trial reports each epoch and the driver logs to the trial's MLflow run.
TRIAL_METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "train_top1", "params", "macs", "flops")


def search_space(sweep: SweepConfig) -> dict:
    """``sweep.space`` in Tune's terms: lists become grids, ``{sampler: args}`` Tune samplers."""
    space = {}
    for key, spec in sweep.space.items():
        if isinstance(spec, list):
            space[key] = tune.grid_search(spec)
        else:
            ((sampler, args),) = spec.items()
            space[key] = tune.choice(args) if sampler == "choice" else getattr(tune, sampler)(*args)
    return space


def split_trial_config(cfg: Config, config: dict):
    """A trial's sampled values -> its resolved architecture and train sections."""
    arch = cfg.trial_arch({k: v for k, v in config.items() if k in ARCH_KEYS})
    train = cfg.trial_train({k: v for k, v in config.items() if k not in ARCH_KEYS})
    return arch, train


# ---------------------------------------------------------------------------------------------
# The trial: runs on any node of the cluster.


class ReportEachEpoch(pl.Callback):
    """After every epoch (validation included): metrics, the model's counts and a checkpoint to
    Ray, which lets the scheduler stop the trial and a retry resume from this epoch. ``session`` is
    ``ray.tune`` in a one-process trial, ``ray.train`` on each Ray Train worker."""

    def __init__(self, counts: sasa.Counts, session):
        self.counts, self.session = counts, session

    def on_train_epoch_end(self, trainer, pl_module):
        logged = trainer.callback_metrics
        metrics = {k: float(logged[k]) for k in TRIAL_METRICS if k in logged}
        metrics.update(self.counts.as_dict(), epoch=trainer.current_epoch + 1, node_id=ray.get_runtime_context().get_node_id())
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(os.path.join(folder, CHECKPOINT))  # written by global rank 0 only
            checkpoint = self.session.Checkpoint.from_directory(folder) if trainer.is_global_zero else None
            self.session.report(metrics, checkpoint=checkpoint)


def fit_trial(config: dict, cfg: Config, prepared: str, session, **placement):
    """The train stage's module and data in a Trainer placed by ``placement``, resumed from the
    trial's latest checkpoint in ``session`` (``ray.tune`` or ``ray.train``) when there is one."""
    arch, train = split_trial_config(cfg, config)
    pl.seed_everything(train.seed, workers=True)
    data = PreparedDataModule(cfg.data, train.batch_size, prepared, seed=train.seed)
    module = Classifier(arch.model_dump(), data.num_classes, data.in_chans, train.model_dump())
    counts = sasa.count(module.model, (data.in_chans, cfg.data.resolution, cfg.data.resolution))
    trainer = build_trainer(
        train, accelerator="gpu" if cfg.sweep.resources.gpu else "cpu", logger=False, enable_checkpointing=False,
        callbacks=[ReportEachEpoch(counts, session)], **placement,
    )
    checkpoint = session.get_checkpoint()
    if checkpoint is None:
        trainer.fit(module, datamodule=data)
        return
    with checkpoint.as_directory() as folder:
        trainer.fit(module, datamodule=data, ckpt_path=os.path.join(folder, CHECKPOINT), weights_only=True)


def run_trial(config: dict, cfg: Config, prepared: str):
    """A trial in one process (``resources.workers == 1``)."""
    fit_trial(config, cfg, prepared, tune, devices=1, num_nodes=1, strategy="auto")


def _ddp_worker(loop_config: dict):
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

    fit_trial(
        loop_config["trial"], loop_config["cfg"], loop_config["prepared"], ray.train,
        devices="auto", num_nodes=1, strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
    )


def run_ddp_trial(config: dict, cfg: Config, prepared: str, storage: str):
    """A trial that is a DDP job of ``resources.workers`` Ray Train workers; this function only drives
    it. A retried trial starts a Train run of the same name, which resumes from its last checkpoint."""
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = cfg.sweep.resources
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"trial": config, "cfg": cfg, "prepared": prepared},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=res.gpu > 0, resources_per_worker={"CPU": res.cpu, "GPU": res.gpu}
        ),
        run_config=ray.train.RunConfig(
            name=tune.get_context().get_trial_id(), storage_path=storage, callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------
# The driver.


class MlflowTrials(tune.Callback):
    """One MLflow run per trial, nested under the sweep's parent run and written by the driver.

    Ray's ``MLflowLoggerCallback`` keeps its trial -> run map in memory only; this one finds a
    trial's run again by its ``sasa.trial_id`` tag, so a restored sweep continues the same runs.
    """

    def __init__(self, cfg: Config, experiment_id: str, parent_id: str):
        self.cfg, self.experiment_id, self.parent_id = cfg, experiment_id, parent_id
        self.runs, self.open = {}, set()

    @property
    def client(self):
        return MlflowClient(tracking_uri(self.cfg))

    def run_id(self, trial) -> str:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = self._find(trial.trial_id) or self._create(trial)
        return self.runs[trial.trial_id]

    def run_id_of(self, trial_id: str) -> str | None:
        return self.runs.get(trial_id) or self._find(trial_id)

    def _find(self, trial_id):
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.`sasa.trial_id` = '{trial_id}'",
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def _create(self, trial):
        arch, train = split_trial_config(self.cfg, trial.config)
        tags = {
            "mlflow.parentRunId": self.parent_id, "sasa.kind": "sweep_trial", "sasa.sweep": self.cfg.sweep.name,
            "sasa.trial_id": trial.trial_id, "sasa.model": arch.model_name, "sasa.form": arch.form_name, "sasa.mixer": arch.mixer_name,
        }
        run = self.client.create_run(self.experiment_id, run_name=str(trial), tags=tags)
        params = {**flatten("arch", arch.model_dump()), **flatten("train", train.model_dump()), **flatten("data", self.cfg.data.model_dump())}
        params.update(flatten("trial", trial.config))
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.client.update_run(self.run_id(trial), status="RUNNING")  # a restored trial's run may be KILLED
        self.open.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        now, step = int(time.time() * 1000), int(result["epoch"])
        metrics = [Metric(k, float(result[k]), now, step) for k in (*TRIAL_METRICS, "epoch") if k in result]
        self.client.log_batch(self.run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.client.set_terminated(self.run_id(trial), "FINISHED")
        self.open.discard(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.client.set_terminated(self.run_id(trial), "FAILED")
        self.open.discard(trial.trial_id)

    def kill_open_runs(self):
        """After an interruption: the runs of trials that were still going are KILLED, not RUNNING."""
        for trial_id in self.open:
            self.client.set_terminated(self.runs[trial_id], "KILLED")
        self.open.clear()


def _storage_path(cfg: Config) -> str:
    """Tune needs an absolute path or a URI; relative paths are under the project folder."""
    path = cfg.sweep.storage_path
    return path if "://" in path else str(Path(path).resolve())


def _resumable_sweep(cfg: Config, client: MlflowClient, exp_id: str) -> dict | None:
    """The state of an interrupted sweep with the same configuration whose parent run still exists."""
    if not STATE.is_file():
        return None
    state = json.loads(STATE.read_text())
    if state.get("finished") or state.get("fingerprint") != cfg.sweep_fingerprint():
        return None
    if not run_in_experiment(client, state["parent_run_id"], exp_id):
        return None
    client.update_run(state["parent_run_id"], status="RUNNING")  # it was marked KILLED when interrupted
    return state


def _start_parent_run(cfg: Config, client: MlflowClient, exp_id: str) -> dict:
    tags = {"sasa.kind": "sweep", "sasa.sweep": cfg.sweep.name, "sasa.fingerprint": cfg.sweep_fingerprint(), "dvc.stage": "sweep"}
    tags.update(source_tags())
    run = client.create_run(exp_id, run_name=f"sweep {cfg.sweep.name}", tags=tags)
    params = flatten("sweep", cfg.sweep.model_dump(exclude={"space", "train", "scheduler", "resources"}))
    params.update(flatten("space", {k: json.dumps(v) for k, v in cfg.sweep.space.items()}))
    params.update(flatten("scheduler", cfg.sweep.scheduler.model_dump()))
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    state = {
        "fingerprint": cfg.sweep_fingerprint(), "parent_run_id": run.info.run_id,
        "experiment": f"{cfg.sweep.name}-{run.info.run_id[:8]}",  # a new sweep never restores an old one
    }
    atomic_write_text(STATE, json.dumps(state))
    return state


def _connect(cfg: Config):
    # Checkpointing every epoch of short trials is what this sweep is meant to do; Tune warns about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    address = os.environ.get("RAY_ADDRESS") or cfg.sweep.address
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:  # the dashboard of a runtime this stage starts is for this machine only
        ray.init(address="local", ignore_reinit_error=True, log_to_driver=False, dashboard_host="127.0.0.1")
    sigterm_as_ctrl_c()
    where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
    print(f"sweep: {where}, {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {len(ray.nodes())} node(s)")


def _check_resources(cfg: Config):
    """A trial that no node can hold would wait forever: refuse it before any trial starts."""
    res = cfg.sweep.resources
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for key, per_worker in (("cpu", res.cpu), ("gpu", res.gpu)):
        largest = max((n.get(key.upper(), 0) for n in nodes), default=0)
        if per_worker > largest:
            raise ConfigError(f"sweep.resources.{key}={per_worker} per worker, but the largest node has {largest:g} {key.upper()}(s)")
        total = sum(n.get(key.upper(), 0) for n in nodes)
        if per_worker * res.workers > total:
            raise ConfigError(f"sweep.resources: {res.workers} workers x {per_worker} {key.upper()} exceed the cluster's {total:g}")


def _trainable(cfg: Config, path: str):
    res, prepared = cfg.sweep.resources, str(PREPARED.resolve())
    if res.workers > 1:  # the Train workers hold the resources; the function driving them next to none
        trial = tune.with_parameters(run_ddp_trial, cfg=cfg, prepared=prepared, storage=f"{path}/train")
        return tune.with_resources(trial, {"cpu": 0.01})
    trial = tune.with_parameters(run_trial, cfg=cfg, prepared=prepared)
    return tune.with_resources(trial, {"cpu": res.cpu, "gpu": res.gpu})


def _tuner(cfg: Config, state: dict, callback: MlflowTrials) -> tune.Tuner:
    storage = _storage_path(cfg)
    path = f"{storage.rstrip('/')}/{state['experiment']}"
    trainable = _trainable(cfg, path)
    if tune.Tuner.can_restore(path):
        print(f"sweep: resuming {path}")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, param_space=search_space(cfg.sweep))
    s = cfg.sweep
    epochs = cfg.trial_train().epochs
    if s.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=s.scheduler.grace_period,
                                  reduction_factor=s.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=search_space(s),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=state["experiment"], storage_path=storage, callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1,
        ),
    )


def result_rows(cfg: Config, results, callback: MlflowTrials) -> list[dict]:
    """One row per trial: its swept values, counts, best epoch's metric, epochs run, node."""
    rows, epochs = [], cfg.trial_train().epochs
    for result in results:
        history = result.metrics_dataframe
        if history is None or history.empty:
            continue
        last = history.iloc[-1]
        arch, _ = split_trial_config(cfg, result.config)
        resolved = arch.build(num_classes=10, in_chans=3).config  # the model's defaults filled in
        row = {"trial_id": last["trial_id"]}
        row.update({k: json.dumps(v) if isinstance(v, list) else v for k, v in result.config.items()})
        row.update({
            "kernel_size": resolved["kernel_size"], "stem": resolved["stem"],
            "params": int(last["params"]), "mflops": last["flops"] / 1e6, "best_top1": 100 * history["val_top1"].max(),
            "best_val_loss": history["val_loss"].min(), "epochs": int(last["epoch"]), "stopped_early": int(last["epoch"]) < epochs,
            "node_ip": last["node_ip"], "node_id": last["node_id"], "mlflow_run_id": callback.run_id_of(last["trial_id"]),
        })
        rows.append(row)
    return sorted(rows, key=lambda r: (r["kernel_size"], r["stem"]))


def sweep(cfg: Config):
    batch_sizes = cfg.sweep.discrete_values("batch_size") if "batch_size" in cfg.sweep.space else [cfg.trial_train().batch_size]
    preflight.prepared_data(PREPARED, max(batch_sizes), key="sweep: a trial's batch_size")
    preflight.tracking(cfg)
    started = time.perf_counter()
    _connect(cfg)
    try:
        _check_resources(cfg)
        client = MlflowClient(tracking_uri(cfg))
        exp_id = experiment_id(client, cfg)
        state = _resumable_sweep(cfg, client, exp_id) or _start_parent_run(cfg, client, exp_id)
        callback = MlflowTrials(cfg, exp_id, state["parent_run_id"])
        results = _tuner(cfg, state, callback).fit()
    finally:
        ray.shutdown()
    unfinished = cfg.sweep.trial_count() - results.num_terminated - results.num_errors
    if unfinished:  # Tune stops gracefully on Ctrl-C (and SIGTERM, see run_stage) and keeps the experiment's state
        callback.kill_open_runs()
        client.set_terminated(state["parent_run_id"], "KILLED")
        print(f"sweep: interrupted with {unfinished} trial(s) unfinished", file=sys.stderr)
        raise KeyboardInterrupt
    failed = [r for r in results if r.error]
    if failed:
        names = ", ".join(f"{r.metrics.get('trial_id', '?')} ({type(r.error).__name__})" for r in failed)
        raise StageError(f"{len(failed)} trial(s) failed after {cfg.sweep.max_failures} retries: {names}; "
                         f"logs under {_storage_path(cfg)}/{state['experiment']}. Re-run the stage to retry them.")
    rows = result_rows(cfg, results, callback)
    best = max(rows, key=lambda r: r["best_top1"])
    parent = state["parent_run_id"]
    client.log_metric(parent, "best_top1", best["best_top1"] / 100)
    client.log_metric(parent, "trials", len(rows))
    client.log_metric(parent, "wall_s", time.perf_counter() - started)
    client.log_text(parent, csv_text(rows), "results.csv")
    atomic_write_text(RESULTS, csv_text(rows))
    client.set_terminated(parent, "FINISHED")
    atomic_write_text(STATE, json.dumps({**state, "finished": True}))
    print(f"sweep: {len(rows)} trials; best top-1 {best['best_top1']:.2f}% ({ {k: best[k] for k in cfg.sweep.space} }); wrote {RESULTS}")


def main(argv=None):
    run_stage(__doc__.splitlines()[0], lambda cfg, args: sweep(cfg), argv=argv)


if __name__ == "__main__":
    main()
