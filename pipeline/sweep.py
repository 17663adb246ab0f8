"""Stage ``sweep``: a Ray Tune search over the spatial extent, the stem, ... of one variant.

``python -m pipeline.sweep``. Joins the Ray cluster at ``RAY_ADDRESS`` / ``sweep.address`` or starts
a local runtime. On a cluster the project's code travels to every node as the job's Ray
``runtime_env`` working directory and ``data/prepared`` through Ray's object store, so trials
depend on no path of the head node; what must be shared (a local ``sweep.storage_path``, an image
folder's files) is checked from every node before any trial starts. Every trial runs the train stage's ``Classifier`` and ``PreparedDataModule`` in a
Lightning Trainer, reports each epoch to Tune (ASHA may stop it there) with a checkpoint, so a failed
trial is retried from its last epoch. The driver logs each trial as an MLflow run nested under one
parent run per sweep: trials never touch the tracking store, so a SQLite file on the head node
serves a whole cluster. A re-run after the driver died restores the Tune experiment and runs only
the unfinished trials; Ctrl-C or SIGTERM stops it gracefully and marks its MLflow runs KILLED
(found in MLflow, so also those a restored sweep reopened).
``sweep/results.csv`` (one row per trial) is written last.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import lightning.pytorch as pl
import ray
import ray.train
from mlflow import MlflowClient
from mlflow.entities import Metric
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import sasa
from pipeline import preflight
from pipeline.config import Config, ConfigError, is_arch_key
from pipeline.data import PREPARED
from pipeline.locations import in_project
from pipeline.module import build_run, build_trainer
from pipeline.runstate import RunRecord
from pipeline.stage import StageError, atomic_write_text, csv_text, run_stage, sigterm_as_ctrl_c
from pipeline.tracking import (context_tags, count_metrics, experiment_id, flatten, log_dataset, log_params, run_identity,
                               run_params, tracking_uri)

SWEEP = Path("sweep")
RESULTS = SWEEP / "results.csv"
CHECKPOINT = "last.ckpt"
NODE_CHECK_TIMEOUT_S = 120  # a node's first task unpacks the project and starts a worker
# Not shipped to the workers with the project (Ray also leaves out what .gitignore lists).
RUNTIME_ENV_EXCLUDES = [".git", ".dvc/cache", ".dvc/tmp"]
# What a trial reports each epoch (with its model's counts) and the driver logs to its MLflow run.
TRIAL_METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "train_top1")


def is_trial_metric(name: str) -> bool:
    """What a trial reports and its run logs: the metrics above and sparse experts' auxiliary losses."""
    return name in TRIAL_METRICS or name.startswith("moe_")


def search_space(cfg: Config) -> dict:
    """``sweep.space`` in Tune's terms: lists become grids, ``{sampler: args}`` Tune samplers; and a
    grid over ``train.seeds``, so trials repeat like the variants do and pair with them by seed."""
    space = {}
    for key, spec in cfg.sweep.space.items():
        if isinstance(spec, list):
            space[key] = tune.grid_search(spec)
        else:
            ((sampler, args),) = spec.items()
            space[key] = tune.choice(args) if sampler == "choice" else getattr(tune, sampler)(*args)
    space["seed"] = tune.grid_search(cfg.train.seeds)
    return space


def split_trial_config(cfg: Config, config: dict):
    """A trial's sampled values -> its resolved architecture and train sections (its seed is ``config["seed"]``)."""
    arch = cfg.trial_arch({k: v for k, v in config.items() if is_arch_key(k)})
    train = cfg.trial_train({k: v for k, v in config.items() if not is_arch_key(k) and k != "seed"})
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
        metrics = {k: float(v) for k, v in logged.items() if is_trial_metric(k)}
        metrics.update(self.counts.as_dict(), epoch=trainer.current_epoch + 1, node_id=ray.get_runtime_context().get_node_id())
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(os.path.join(folder, CHECKPOINT))  # written by global rank 0 only
            checkpoint = self.session.Checkpoint.from_directory(folder) if trainer.is_global_zero else None
            self.session.report(metrics, checkpoint=checkpoint)


def pack_prepared() -> dict[str, bytes]:
    """``data/prepared`` as bytes, for Ray's object store: a trial on a node without the head's disk
    still reads it. An image folder's images stay where ``meta.json``'s root says (shared storage)."""
    return {path.name: path.read_bytes() for path in PREPARED.iterdir() if path.is_file()}


def fit_trial(config: dict, cfg: Config, prepared: dict[str, bytes], session, **placement):
    """The train stage's module and data in a Trainer placed by ``placement``, resumed from the
    trial's latest checkpoint in ``session`` (``ray.tune`` or ``ray.train``) when there is one."""
    arch, train = split_trial_config(cfg, config)
    with tempfile.TemporaryDirectory(prefix="sasa-prepared-") as folder:
        for name, data in prepared.items():
            Path(folder, name).write_bytes(data)
        run = build_run(cfg.data, arch, train, config["seed"], folder)
        trainer = build_trainer(
            train, accelerator="gpu" if cfg.sweep.resources.gpu else "cpu", logger=False, enable_checkpointing=False,
            callbacks=[ReportEachEpoch(run.counts, session)], **placement,
        )
        checkpoint = session.get_checkpoint()
        if checkpoint is None:
            trainer.fit(run.module, datamodule=run.data)
            return
        with checkpoint.as_directory() as ckpt_folder:
            trainer.fit(run.module, datamodule=run.data, ckpt_path=os.path.join(ckpt_folder, CHECKPOINT), weights_only=True)


def run_trial(config: dict, cfg: Config, prepared: dict[str, bytes]):
    """A trial in one process (``resources.workers == 1``)."""
    fit_trial(config, cfg, prepared, tune, devices=1, num_nodes=1, strategy="auto")


def _ddp_worker(loop_config: dict):
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

    fit_trial(
        loop_config["trial"], loop_config["cfg"], ray.get(loop_config["prepared"]), ray.train,
        devices="auto", num_nodes=1, strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
    )


def run_ddp_trial(config: dict, cfg: Config, prepared: dict[str, bytes], storage: str):
    """A trial that is a DDP job of ``resources.workers`` Ray Train workers; this function only drives
    it. A retried trial starts a Train run of the same name, which resumes from its last checkpoint."""
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = cfg.sweep.resources
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"trial": config, "cfg": cfg, "prepared": ray.put(prepared)},
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
        self.runs = {}

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
        model = arch.build(num_classes=10, in_chans=3)  # the resolved architecture does not depend on either
        values = trial_values(self.cfg, trial.config)
        tags = {"mlflow.parentRunId": self.parent_id, "sasa.kind": "sweep_trial", "sasa.sweep": self.cfg.sweep.name,
                "sasa.trial_id": trial.trial_id, "sasa.trial_values": values}
        tags.update(run_identity(model, arch.model_name, self.cfg.recipe(train), trial.config["seed"]), **context_tags())
        run_name = f"{self.cfg.sweep.name} {values} seed {trial.config['seed']}"  # e.g. "k5 kernel_size=5 seed 0"
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        log_params(self.client, run.info.run_id, run_params(self.cfg, arch, train, trial.config["seed"], model))
        log_dataset(self.client, run.info.run_id, self.cfg.data.source, PREPARED)
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.client.update_run(self.run_id(trial), status="RUNNING")  # a restored trial's run may be KILLED

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """The epoch's metrics at step = epochs completed; the model's counts once, at step 0, as a
        train run has them."""
        run_id, now, step = self.run_id(trial), int(time.time() * 1000), int(result["epoch"])
        metrics = [Metric(k, float(result[k]), now, step) for k in result if is_trial_metric(k)]
        if "num_params" not in self.client.get_run(run_id).data.metrics:
            counts = sasa.Counts(**{k: int(result[k]) for k in ("params", "macs", "flops")})
            metrics += [Metric(k, float(v), now, 0) for k, v in count_metrics(counts).items()]
        self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        """A trial that ran every epoch gets ``top1``/``top5``, its last epoch's, as a variant's run
        does: the report pools it with variants of the same architecture and recipe. An ASHA-stopped
        trial trained less, so it gets none and stays out of the report's tables."""
        run_id, last = self.run_id(trial), trial.last_result or {}
        if last.get("epoch") == split_trial_config(self.cfg, trial.config)[1].epochs:
            self.client.log_batch(run_id, metrics=[Metric(k, float(last[f"val_{k}"]), int(time.time() * 1000), last["epoch"])
                                                   for k in ("top1", "top5") if f"val_{k}" in last])
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.client.set_terminated(self.run_id(trial), "FAILED")


def kill_open_runs(client: MlflowClient, experiment_id: str, parent_id: str):
    """After an interruption the sweep's runs still going are KILLED, not RUNNING. Looked up in MLflow:
    a restored sweep runs the callback pickled in Tune's state, not this process's instance."""
    still_running = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'",
        max_results=10_000,
    )
    for run in still_running:
        client.set_terminated(run.info.run_id, "KILLED")
    client.set_terminated(parent_id, "KILLED")


def _storage_path(cfg: Config) -> str:
    """Tune needs an absolute path or a URI; relative paths are under the project root (also from a
    temporary DVC experiment, whose copy is deleted when it ends)."""
    return in_project(cfg.sweep.storage_path)


def state_path() -> Path:
    """The sweep's resume record, beside the project's tracking store and Tune experiments."""
    return Path(in_project(str(SWEEP / "state.json")))


def trial_values(cfg: Config, config: dict) -> str:
    """A trial's swept values, as its run name and the report show them: ``kernel_size=5``."""
    return " ".join(f"{k}={config[k]:.3g}" if isinstance(config[k], float) else f"{k}={config[k]}" for k in cfg.sweep.space)


def _start_parent_run(cfg: Config, client: MlflowClient, exp_id: str) -> dict:
    tags = {"sasa.kind": "sweep", "sasa.sweep": cfg.sweep.name, "sasa.fingerprint": cfg.sweep_fingerprint(), "dvc.stage": "sweep"}
    tags.update(context_tags())
    run = client.create_run(exp_id, run_name=f"sweep {cfg.sweep.name}", tags=tags)
    log_params(client, run.info.run_id, flatten(cfg.sweep.model_dump(), "sweep"))
    state = {
        "fingerprint": cfg.sweep_fingerprint(), "run_id": run.info.run_id,
        "experiment": f"{cfg.sweep.name}-{run.info.run_id[:8]}",  # a new sweep never restores an old one
    }
    RunRecord(state_path()).write(state)
    return state


def _connect(cfg: Config) -> str | None:
    """Join the cluster (shipping the project's code to its nodes) or start a local runtime."""
    # Checkpointing every epoch of short trials is what this sweep is meant to do; Tune warns about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    address = os.environ.get("RAY_ADDRESS") or cfg.sweep.address
    if address:
        runtime_env = {"working_dir": str(Path.cwd()), "excludes": RUNTIME_ENV_EXCLUDES}
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, runtime_env=runtime_env)
    else:  # the dashboard of a runtime this stage starts is for this machine only
        ray.init(address="local", ignore_reinit_error=True, log_to_driver=False, dashboard_host="127.0.0.1")
    sigterm_as_ctrl_c()
    where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
    print(f"sweep: {where}, {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {len(ray.nodes())} node(s)")
    return address


def _alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def _check_resources(cfg: Config):
    """A trial that no node can hold would wait forever: refuse it before any trial starts."""
    res = cfg.sweep.resources
    nodes = [n["Resources"] for n in _alive_nodes()]
    for key, per_worker in (("cpu", res.cpu), ("gpu", res.gpu)):
        largest = max((n.get(key.upper(), 0) for n in nodes), default=0)
        if per_worker > largest:
            raise ConfigError(f"sweep.resources.{key}={per_worker} per worker, but the largest node has {largest:g} {key.upper()}(s)")
        total = sum(n.get(key.upper(), 0) for n in nodes)
        if per_worker * res.workers > total:
            raise ConfigError(f"sweep.resources: {res.workers} workers x {per_worker} {key.upper()} exceed the cluster's {total:g}")


@ray.remote(num_cpus=0)
def _unreadable(files: dict[str, tuple[str, str | None]]) -> list[str]:
    """On one node: the keys of ``files`` (key -> (path, expected text, or None for any folder))
    this node cannot read as expected."""
    bad = []
    for key, (path, text) in files.items():
        try:
            ok = Path(path).is_dir() if text is None else Path(path).read_text() == text
        except OSError:
            ok = False
        if not ok:
            bad.append(key)
    return bad


def _check_shared_paths(cfg: Config, meta: dict):
    """On a cluster every node must see what the trials share by path: a local ``sweep.storage_path``
    (Tune's checkpoints) and an image folder's files. Asked of each node before any trial starts."""
    nodes, storage = _alive_nodes(), cfg.sweep.storage_path
    if "://" not in storage and not Path(storage).is_absolute() and len(nodes) > 1:
        raise ConfigError(
            f"sweep.storage_path={storage!r} is a folder of the head node's project, which the other {len(nodes) - 1} "
            f"node(s) of this cluster cannot see: set it to a folder every node mounts at the same absolute path "
            f"(e.g. /shared/sweeps on NFS) or to a URI (s3://BUCKET/sweeps, gs://BUCKET/sweeps)"
        )
    files, token_file = {}, None
    if "://" not in storage:
        token_file = Path(_storage_path(cfg), f".shared-check-{uuid.uuid4().hex}")
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token_file.name)
        files["sweep.storage_path"] = (str(token_file), token_file.name)
    if meta["format"] == "files":
        files["data.path"] = (meta["root"], None)
    try:
        checks = {
            f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": _unreadable.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(files)
            for n in nodes
        }
        answers = dict(zip(checks, ray.get(list(checks.values()), timeout=NODE_CHECK_TIMEOUT_S)))
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"sweep: not every Ray node answered within {NODE_CHECK_TIMEOUT_S} s; check `ray status`") from None
    finally:
        if token_file:
            token_file.unlink(missing_ok=True)
    blind = {key: [node for node, bad in answers.items() if key in bad] for key in files}
    problems = [f"{key}: {files[key][0] if key == 'data.path' else storage} cannot be read on node(s) {', '.join(nodes_)}"
                for key, nodes_ in blind.items() if nodes_]
    if problems:
        raise ConfigError("; ".join(problems) + ". Every node must mount these at the same absolute path (shared storage such as NFS)"
                          "; sweep.storage_path may also be a URI (s3://, gs://)")


def _trainable(cfg: Config, path: str):
    res, prepared = cfg.sweep.resources, pack_prepared()  # with_parameters keeps it in the object store
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
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, param_space=search_space(cfg))
    s = cfg.sweep
    epochs = cfg.trial_train().epochs
    if s.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=s.scheduler.grace_period,
                                  reduction_factor=s.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=state["experiment"], storage_path=storage, callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1,
        ),
    )


def result_rows(cfg: Config, results, callback: MlflowTrials) -> list[dict]:
    """One row per trial: its swept values, counts, last epoch's metrics (and best epoch's top-1),
    epochs run (an ASHA-stopped trial's last epoch is the one it was stopped at), node."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        if history is None or history.empty:
            continue
        last = history.iloc[-1]
        arch, train = split_trial_config(cfg, result.config)
        resolved = arch.build(num_classes=10, in_chans=3).config  # the model's defaults filled in
        row = {"trial_id": last["trial_id"]}
        row.update({k: json.dumps(v) if isinstance(v, list) else v for k, v in result.config.items()})
        row.update({
            "kernel_size": resolved.get("kernel_size"), "stem": resolved.get("stem"), "seed": result.config["seed"],  # None: not a ResNet
            "params": int(last["params"]), "mflops": last["flops"] / 1e6,
            # top-1 is the last epoch's everywhere (what the paper reports); the best epoch's is labelled
            "top1": 100 * last["val_top1"], "val_loss": last["val_loss"], "best_epoch_top1": 100 * history["val_top1"].max(),
            "epochs": int(last["epoch"]), "stopped_early": int(last["epoch"]) < train.epochs,
            "node_ip": last["node_ip"], "node_id": last["node_id"], "mlflow_run_id": callback.run_id_of(last["trial_id"]),
        })
        rows.append(row)
    return sorted(rows, key=lambda r: (r["kernel_size"] or 0, r["stem"] or "", r["seed"]))


def sweep(cfg: Config):
    batch_sizes = cfg.sweep.discrete_values("batch_size") if "batch_size" in cfg.sweep.space else [cfg.trial_train().batch_size]
    meta = preflight.prepared_data(PREPARED, max(batch_sizes), key="sweep: a trial's batch_size")
    preflight.tracking(cfg)
    started = time.perf_counter()
    address = _connect(cfg)
    try:
        _check_resources(cfg)
        if address:
            _check_shared_paths(cfg, meta)
        client = MlflowClient(tracking_uri(cfg))
        exp_id = experiment_id(client, cfg)
        state = RunRecord(state_path()).resumable(cfg.sweep_fingerprint(), client, exp_id) or _start_parent_run(cfg, client, exp_id)
        parent = state["run_id"]
        callback = MlflowTrials(cfg, exp_id, parent)
        results = _tuner(cfg, state, callback).fit()
    finally:
        ray.shutdown()
    unfinished = cfg.sweep.trial_count(len(cfg.train.seeds)) - results.num_terminated - results.num_errors
    if unfinished:  # Tune stops gracefully on Ctrl-C (and SIGTERM, see run_stage) and keeps the experiment's state
        kill_open_runs(client, exp_id, parent)
        print(f"sweep: interrupted with {unfinished} trial(s) unfinished", file=sys.stderr)
        raise KeyboardInterrupt
    failed = [r for r in results if r.error]
    if failed:
        names = ", ".join(f"{r.metrics.get('trial_id', '?')} ({type(r.error).__name__})" for r in failed)
        raise StageError(f"{len(failed)} trial(s) failed after {cfg.sweep.max_failures} retries: {names}; "
                         f"logs under {_storage_path(cfg)}/{state['experiment']}. Re-run the stage to retry them.")
    rows = result_rows(cfg, results, callback)
    column = {"val_top1": "top1", "val_loss": "val_loss"}[cfg.sweep.metric]
    best = (max if cfg.sweep.mode == "max" else min)(rows, key=lambda r: r[column])
    client.log_metric(parent, "best_trial_top1", best["top1"] / 100)
    client.log_metric(parent, "trials", len(rows))
    client.log_metric(parent, "wall_s", time.perf_counter() - started)
    client.log_text(parent, csv_text(rows), "results.csv")
    atomic_write_text(RESULTS, csv_text(rows))
    client.set_terminated(parent, "FINISHED")
    RunRecord(state_path()).finish()
    print(f"sweep: {len(rows)} trials; best by {cfg.sweep.metric} ({cfg.sweep.mode}): { {k: best[k] for k in cfg.sweep.space} }, "
          f"top-1 {best['top1']:.2f}% at its last epoch; wrote {RESULTS}")


def main(argv=None):
    run_stage(__doc__.splitlines()[0], lambda cfg, args: sweep(cfg), argv=argv)


if __name__ == "__main__":
    main()
