"""Stage ``sweep``: a Ray Tune search over the spatial extent, the stem, ... of one variant.

``python -m pipeline.sweep``: the driver. Joins the Ray cluster at ``RAY_ADDRESS`` / ``sweep.address``
or starts a local runtime. On a cluster the project's code travels to every node as the job's Ray
``runtime_env`` working directory and ``data/prepared`` through Ray's object store, so trials
depend on no path of the head node; what must be shared (a local ``sweep.storage_path``, an image
folder's files) is checked from every node before any trial starts. Every trial (``pipeline.trial``)
trains the train stage's model and data, reports each epoch to Tune (ASHA may stop it there) with a
checkpoint, so a failed trial is retried from its last epoch. The driver logs each trial as an MLflow
run nested under one parent run per sweep (``pipeline.sweep_results``). ``sweep/state.json`` ties the
sweep's configuration to that parent run and its Tune experiment: a re-run after the driver died
restores the experiment and runs only the unfinished trials; Ctrl-C or SIGTERM stops it gracefully
and marks its MLflow runs KILLED (found in MLflow, so also those a restored sweep reopened).
``sweep/results.csv`` (one row per trial) is written last.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import ray
from mlflow import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import preflight
from pipeline.config import Config, ConfigError
from pipeline.console import progress_bar, say, stdout_to_log
from pipeline.data import PREPARED
from pipeline.locations import in_project
from pipeline.runstate import RunRecord
from pipeline.stage import StageError, run_stage, sigterm_as_ctrl_c
from pipeline.sweep_results import RESULTS, MlflowTrials, kill_open_runs, record_results, result_rows
from pipeline.tracking import context_tags, experiment_id, flatten, log_params, tracking_uri
from pipeline.trial import split_trial_config, trainable

STATE = Path("sweep") / "state.json"
# Trials' output stays in Ray's session logs (/tmp/ray/session_latest/logs); Ray's own lines go to the
# stage's log file (pipeline.console), which configure_logging=False leaves in place.
RAY_INIT = dict(ignore_reinit_error=True, log_to_driver=False, configure_logging=False)
NODE_CHECK_TIMEOUT_S = 120  # a node's first task unpacks the project and starts a worker
# Not shipped to the workers with the project (Ray also leaves out what .gitignore lists).
RUNTIME_ENV_EXCLUDES = [".git", ".dvc/cache", ".dvc/tmp"]


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


def _storage_path(cfg: Config) -> str:
    """Tune needs an absolute path or a URI; relative paths are under the project root (also from a
    temporary DVC experiment, whose copy is deleted when it ends)."""
    return in_project(cfg.sweep.storage_path)


def state_record() -> RunRecord:
    """The sweep's resume record (its parent run and Tune experiment), beside the project's tracking
    store and Tune experiments."""
    return RunRecord(in_project(str(STATE)), fields=("fingerprint", "run_id", "experiment"))


def _start_parent_run(cfg: Config, client: MlflowClient, exp_id: str) -> dict:
    tags = {
        "sasa.kind": "sweep",
        "sasa.sweep": cfg.sweep.name,
        "sasa.fingerprint": cfg.sweep_fingerprint(),
        "dvc.stage": "sweep",
    }
    tags.update(context_tags())
    run = client.create_run(exp_id, run_name=f"sweep {cfg.sweep.name}", tags=tags)
    log_params(client, run.info.run_id, flatten(cfg.sweep.model_dump(), "sweep"))
    return {
        "run_id": run.info.run_id,
        "experiment": f"{cfg.sweep.name}-{run.info.run_id[:8]}",
    }  # a new sweep never restores an old one


class SweepProgress(tune.Callback):
    """The sweep's one bar: epochs trained over all trials (a finished, stopped or failed trial counts
    whole; a restored sweep starts where it stopped), with how many run and have finished."""

    def __init__(self, cfg: Config):
        lengths = cfg.sweep.space.get("epochs")
        lengths = lengths if isinstance(lengths, list) else [cfg.trial_train().epochs]
        self.cfg, self.total, self.bar = (
            cfg,
            cfg.sweep.trial_count(len(cfg.train.seeds)) // len(lengths) * sum(lengths),
            None,
        )

    def __getstate__(self):  # Tune saves its callbacks with the experiment; a terminal's bar is not saved
        return {**self.__dict__, "bar": None}

    def setup(self, **info):
        self.bar = progress_bar("sweep", total=self.total, unit="epoch", enabled=self.cfg.train.progress_bar)
        self.shown = None

    def on_step_end(self, iteration, trials, **info):
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        done = sum(split_trial_config(self.cfg, t.config)[1].epochs for t in ended) + sum(
            t.last_result.get("training_iteration", 0) for t in trials if t not in ended
        )
        shown = {"running": sum(t.status == "RUNNING" for t in trials), "finished": len(ended)}
        if (done, shown) != (self.bar.n, self.shown):  # Tune steps many times a second
            self.bar.n, self.shown = done, shown
            self.bar.set_postfix(shown)

    def on_experiment_end(self, trials, **info):
        self.bar.close()


def _connect(cfg: Config) -> str | None:
    """Join the cluster (shipping the project's code to its nodes) or start a local runtime."""
    # Checkpointing every epoch of short trials is what this sweep is meant to do; Tune warns about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    address = os.environ.get("RAY_ADDRESS") or cfg.sweep.address
    if address:
        runtime_env = {"working_dir": str(Path.cwd()), "excludes": RUNTIME_ENV_EXCLUDES}
        ray.init(address=address, runtime_env=runtime_env, **RAY_INIT)
    else:  # the dashboard of a runtime this stage starts is for this machine only
        ray.init(address="local", dashboard_host="127.0.0.1", **RAY_INIT)
    sigterm_as_ctrl_c()
    where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
    say(f"sweep: {where}, {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {len(ray.nodes())} node(s)")
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
            raise ConfigError(
                f"sweep.resources.{key}={per_worker} per worker, but the largest node has {largest:g} {key.upper()}(s)"
            )
        total = sum(n.get(key.upper(), 0) for n in nodes)
        if per_worker * res.workers > total:
            raise ConfigError(
                f"sweep.resources: {res.workers} workers x {per_worker} {key.upper()} exceed the cluster's {total:g}"
            )


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
            f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": _unreadable.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(files)
            for n in nodes
        }
        answers = dict(zip(checks, ray.get(list(checks.values()), timeout=NODE_CHECK_TIMEOUT_S)))
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(
            f"sweep: not every Ray node answered within {NODE_CHECK_TIMEOUT_S} s; check `ray status`"
        ) from None
    finally:
        if token_file:
            token_file.unlink(missing_ok=True)
    blind = {key: [node for node, bad in answers.items() if key in bad] for key in files}
    problems = [
        f"{key}: {files[key][0] if key == 'data.path' else storage} cannot be read on node(s) {', '.join(nodes_)}"
        for key, nodes_ in blind.items()
        if nodes_
    ]
    if problems:
        raise ConfigError(
            "; ".join(problems) + ". Every node must mount these at the same absolute path (shared storage such as NFS)"
            "; sweep.storage_path may also be a URI (s3://, gs://)"
        )


def _tuner(cfg: Config, state: dict, callback: MlflowTrials) -> tune.Tuner:
    storage = _storage_path(cfg)
    path = f"{storage.rstrip('/')}/{state['experiment']}"
    trial = trainable(cfg, path)
    if tune.Tuner.can_restore(path):
        say(f"sweep: resuming {path}")
        return tune.Tuner.restore(
            path, trial, resume_unfinished=True, resume_errored=True, param_space=search_space(cfg)
        )
    s = cfg.sweep
    epochs = cfg.trial_train().epochs
    if s.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=epochs,
            grace_period=s.scheduler.grace_period,
            reduction_factor=s.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trial,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            scheduler=scheduler,
            num_samples=s.num_samples,
            max_concurrent_trials=s.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=state["experiment"],
            storage_path=storage,
            callbacks=[callback, SweepProgress(cfg)],
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,  # no status tables: the stage's bar and lines say what runs
        ),
    )


def sweep(cfg: Config):
    batch_sizes = (
        cfg.sweep.discrete_values("batch_size") if "batch_size" in cfg.sweep.space else [cfg.trial_train().batch_size]
    )
    meta = preflight.prepared_data(PREPARED, max(batch_sizes), cfg.data.task.name, key="sweep: a trial's batch_size")
    preflight.tracking(cfg)
    record = state_record()
    record.read()  # a damaged record stops the stage before Ray starts
    started = time.perf_counter()
    address = _connect(cfg)
    try:
        _check_resources(cfg)
        if address:
            _check_shared_paths(cfg, meta)
        client = MlflowClient(tracking_uri(cfg))
        exp_id = experiment_id(client, cfg)
        state, _ = record.resume_or_start(
            cfg.sweep_fingerprint(), client, exp_id, lambda: _start_parent_run(cfg, client, exp_id)
        )
        parent = state["run_id"]
        callback = MlflowTrials(cfg, exp_id, parent)
        tuner = _tuner(cfg, state, callback)
        with stdout_to_log():
            results = tuner.fit()
    finally:
        ray.shutdown()
    unfinished = cfg.sweep.trial_count(len(cfg.train.seeds)) - results.num_terminated - results.num_errors
    if unfinished:  # Tune stops gracefully on Ctrl-C (and SIGTERM, see run_stage) and keeps the experiment's state
        kill_open_runs(client, exp_id, parent)
        say(f"sweep: interrupted with {unfinished} trial(s) unfinished", error=True)
        raise KeyboardInterrupt
    failed = [r for r in results if r.error]
    if failed:
        names = ", ".join(f"{r.metrics.get('trial_id', '?')} ({type(r.error).__name__})" for r in failed)
        raise StageError(
            f"{len(failed)} trial(s) failed after {cfg.sweep.max_failures} retries: {names}; "
            f"logs under {_storage_path(cfg)}/{state['experiment']}. Re-run the stage to retry them."
        )
    rows = result_rows(cfg, results, callback)
    best = record_results(cfg, client, parent, rows, time.perf_counter() - started)
    client.set_terminated(parent, "FINISHED")
    record.finish()
    say(
        f"sweep: {len(rows)} trials; best by {cfg.sweep.metric} ({cfg.sweep.mode}): "
        f"{ {k: best[k] for k in cfg.sweep.space} }, "
        f"{cfg.data.task.label} {best[cfg.data.task.score]:.2f} at its last epoch; wrote {RESULTS}"
    )


def main(argv=None):
    run_stage(__doc__.splitlines()[0], lambda cfg, args: sweep(cfg), "sweep", argv=argv)


if __name__ == "__main__":
    main()
