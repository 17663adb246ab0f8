"""What a sweep records, all of it written by the driver: one MLflow run per trial nested under the
sweep's parent run, the best trial by ``sweep.metric`` and ``sweep.mode``, and ``sweep/results.csv``.

Trials never touch the tracking store, so a SQLite file on the head node serves a whole cluster.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric
from ray import tune

import sasa
from pipeline.config import Config
from pipeline.data import PREPARED
from pipeline.stage import atomic_write_text, csv_text
from pipeline.tracking import count_metrics, start_training_run, tracking_uri
from pipeline.trial import is_trial_metric, split_trial_config

RESULTS = Path("sweep") / "results.csv"
# sweep.metric -> the results' column holding the trial's value at its last epoch, what Tune compares
METRIC_COLUMNS = {"val_top1": "top1", "val_map": "map", "val_loss": "val_loss"}


def trial_values(cfg: Config, config: dict) -> str:
    """A trial's swept values, as its run name and the report show them: ``kernel_size=5``."""
    return " ".join(
        f"{k}={config[k]:.3g}" if isinstance(config[k], float) else f"{k}={config[k]}" for k in cfg.sweep.space
    )


def _trial_model(cfg: Config, config: dict):
    """A trial's architecture, train section and network as the driver builds it: the resolved
    architecture depends on neither the data's classes nor its channels (the counts do: trials report them)."""
    arch, train = split_trial_config(cfg, config)
    return arch, train, arch.build(num_classes=10, in_chans=3, resolution=cfg.data.resolution)


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
        arch, train, model = _trial_model(self.cfg, trial.config)
        values, seed = trial_values(self.cfg, trial.config), trial.config["seed"]
        tags = {
            "mlflow.parentRunId": self.parent_id,
            "sasa.kind": "sweep_trial",
            "sasa.sweep": self.cfg.sweep.name,
            "sasa.trial_id": trial.trial_id,
            "sasa.trial_values": values,
        }
        name = f"{self.cfg.sweep.name} {values} seed {seed}"  # e.g. "k5 kernel_size=5 seed 0"
        return start_training_run(
            self.client, self.experiment_id, self.cfg, name, tags, arch, train, seed, model, PREPARED
        )

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
        """A trial that ran every epoch gets its task's results (``top1``/``top5``, ``map``...), its
        last epoch's, as a variant's run does: the report pools it with variants of the same
        architecture and recipe. An ASHA-stopped trial trained less, so it gets none and stays out of
        the report's tables."""
        run_id, last = self.run_id(trial), trial.last_result or {}
        if last.get("epoch") == split_trial_config(self.cfg, trial.config)[1].epochs:
            self.client.log_batch(
                run_id,
                metrics=[
                    Metric(k, float(last[f"val_{k}"]), int(time.time() * 1000), last["epoch"])
                    for k in self.cfg.data.task.results
                    if f"val_{k}" in last
                ],
            )
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


def result_rows(cfg: Config, results, callback: MlflowTrials) -> list[dict]:
    """One row per trial: its swept values, counts, last epoch's metrics (and best epoch's score,
    top-1 or mAP), epochs run (an ASHA-stopped trial's last epoch is the one it was stopped at), node."""
    rows, score = [], cfg.data.task.score
    for result in results:
        history = result.metrics_dataframe
        if history is None or history.empty:
            continue
        last = history.iloc[-1]
        _, train, model = _trial_model(cfg, result.config)
        resolved = model.config  # the model's defaults filled in
        row = {"trial_id": last["trial_id"]}
        row.update({k: json.dumps(v) if isinstance(v, list) else v for k, v in result.config.items()})
        row.update(
            {
                "kernel_size": resolved.get("kernel_size"),
                "stem": resolved.get("stem"),
                "seed": result.config["seed"],  # None: not a ResNet
                "params": int(last["params"]),
                "mflops": last["flops"] / 1e6,
                # the score is the last epoch's everywhere (what the paper reports); the best epoch's is labelled
                score: 100 * last[f"val_{score}"],
                **({"val_loss": last["val_loss"]} if "val_loss" in last else {}),  # detectors log none
                f"best_epoch_{score}": 100 * history[f"val_{score}"].max(),
                "epochs": int(last["epoch"]),
                "stopped_early": int(last["epoch"]) < train.epochs,
                "node_ip": last["node_ip"],
                "node_id": last["node_id"],
                "mlflow_run_id": callback.run_id_of(last["trial_id"]),
            }
        )
        rows.append(row)
    return sorted(rows, key=lambda r: (r["kernel_size"] or 0, r["stem"] or "", r["seed"]))


def best_trial(cfg: Config, rows: list[dict]) -> dict:
    """The row of the best trial by ``sweep.metric`` at its last epoch, in ``sweep.mode``: what Tune's
    scheduler compares trials by."""
    pick = max if cfg.sweep.mode == "max" else min
    return pick(rows, key=lambda r: r[METRIC_COLUMNS[cfg.sweep.metric]])


def record_results(cfg: Config, client: MlflowClient, parent_id: str, rows: list[dict], wall_s: float) -> dict:
    """The parent run's summary (the best trial's score and run, trial count, wall time, the table)
    and ``sweep/results.csv``; returns the best trial's row."""
    best, score = best_trial(cfg, rows), cfg.data.task.score
    client.log_metric(parent_id, f"best_trial_{score}", best[score] / 100)
    client.set_tag(parent_id, "sasa.best_trial_run", best["mlflow_run_id"])
    client.log_metric(parent_id, "trials", len(rows))
    client.log_metric(parent_id, "wall_s", wall_s)
    client.log_text(parent_id, csv_text(rows), "results.csv")
    atomic_write_text(RESULTS, csv_text(rows))
    return best
