"""The runs the report reads: every finished training run of the current recipes from MLflow,
pooled into configurations, and the sweep's trials from ``sweep/results.csv``."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

from mlflow import MlflowClient

from pipeline.config import TRAIN_KEYS, Config
from pipeline.locations import redact
from pipeline.report.tables import Configuration
from pipeline.stage import StageError
from pipeline.tasks import TASKS, Task
from pipeline.tracking import tracking_uri

SWEEP_RESULTS = Path("sweep/results.csv")


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def task_of(run) -> Task:
    return TASKS[run.data.tags.get("sasa.task", "classification")]


def run_record(run) -> dict:
    """One run as the report needs it: its task's results in % (``score``: top-1, or a detector's mAP;
    a size class without objects, COCO's -1, is NaN). A variant's run is named by its variant; a sweep
    trial's by its sweep and swept values (``k kernel_size=5``), which are also its ``trial``."""
    m, tags, task = run.data.metrics, run.data.tags, task_of(run)
    arch = {k.split("/", 1)[1]: json.loads(v) for k, v in run.data.params.items() if k.startswith("resolved/")}
    if "attention_groups" in arch:  # a ResNet, or a detector's ResNet backbone
        arch["attention_groups"] = tuple(arch["attention_groups"])
    if "sasa.variant" in tags:
        name, trial = tags["sasa.variant"], None
    else:
        trial = (tags["sasa.sweep"], tags["sasa.trial_values"])
        name = " ".join(trial)
    return {
        "run_id": run.info.run_id,
        "kind": tags["sasa.kind"],
        "name": name,
        "seed": int(tags["sasa.seed"]),
        "trial": trial,
        "arch_hash": tags["sasa.arch"],
        "arch": arch,
        "params": int(m["num_params"]),
        "mflops": m["flops"] / 1e6,
        "task": task.name,
        "score": 100 * m[task.score],
        "results": {k: 100 * m[k] if m.get(k, -1) >= 0 else math.nan for k in task.results},
        "images_per_s": m.get("throughput_images_per_s", math.nan),
        "start_time": run.info.start_time,
    }


def recipes(cfg: Config) -> dict[str, dict]:
    """Every recipe this params file trains by -> its values of the train keys the sweep changes
    (``sweep.train`` and the swept train keys: a trial of ``epochs: [6, 18]`` is another recipe than
    the variants'): the variants' recipe, and the trials' for each grid or choice value."""
    swept = [k for k in cfg.sweep.space if k in TRAIN_KEYS and cfg.sweep.discrete_values(k)]
    changed = sorted({*cfg.sweep.train, *swept})

    def shown(train) -> dict:
        return {k: getattr(train, k) for k in changed}

    found = {cfg.recipe(cfg.train): shown(cfg.train)}
    for values in itertools.product(*(cfg.sweep.discrete_values(k) for k in swept)):
        train = cfg.trial_train(dict(zip(swept, values)))
        found.setdefault(cfg.recipe(train), shown(train))
    return found


def load_runs(cfg: Config) -> tuple[dict[str, list[dict]], list[Configuration]]:
    """The current variants' runs (every seed must have one) and every configuration of the
    current recipe that finished runs cover, by increasing FLOPs."""
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        raise StageError(
            f"no MLflow experiment {cfg.mlflow.experiment!r} at {redact(tracking_uri(cfg))}: run the train stage first"
        )
    exp_id = experiment.experiment_id
    variants, missing = {}, []
    for variant in cfg.models.variants:
        variants[variant] = []
        for seed in cfg.train.seeds:
            found = client.search_runs(
                [exp_id],
                filter_string=(
                    f"tags.`sasa.kind` = 'train' and tags.`sasa.fingerprint` = '{cfg.fingerprint(variant, seed)}' "
                    "and attributes.status = 'FINISHED'"
                ),
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if found:
                variants[variant].append(run_record(found[0]))
            else:
                missing.append(f"{variant} (seed {seed})")
    if missing:
        raise StageError(
            f"no finished MLflow run with the current configuration for: {', '.join(missing)} (run dvc repro)"
        )

    configs = {}  # (recipe, architecture) -> its configuration, with the latest finished run of each seed
    for recipe, train in recipes(cfg).items():
        for run in _search(client, exp_id, f"tags.`sasa.recipe` = '{recipe}' and attributes.status = 'FINISHED'"):
            trained = run.data.tags.get("sasa.kind") in ("train", "sweep_trial")
            if not trained or task_of(run).score not in run.data.metrics:
                continue
            row = run_record(run)
            c = configs.setdefault(
                (recipe, row["arch_hash"]),
                Configuration(row["arch"], row["params"], row["mflops"], row["task"], train=train),
            )
            c.names.add(row["name"])
            if row["trial"]:
                c.trials.add(row["trial"])
            if row["seed"] not in c.runs or row["start_time"] > c.runs[row["seed"]]["start_time"]:
                c.runs[row["seed"]] = row
    return variants, sorted(configs.values(), key=lambda c: c.mflops)


def load_sweep(task: Task, path: Path = SWEEP_RESULTS) -> list[dict]:
    """The sweep's trials, every one (ASHA-stopped too), with their columns typed; ``score`` and
    ``best_epoch_score`` are the task's score (top-1 or mAP)."""
    if not path.is_file():
        raise StageError(f"{path} is missing: run the sweep stage first (dvc repro sweep)")
    rows = list(csv.DictReader(path.open()))
    if not rows:
        raise StageError(f"{path} has no trials")
    for r in rows:
        r.update(
            kernel_size=int(r["kernel_size"]) if r["kernel_size"] else None,
            stem=r["stem"] or None,
            params=int(r["params"]),
            mflops=float(r["mflops"]),
            seed=int(r["seed"]),
            score=float(r[task.score]),
            best_epoch_score=float(r[f"best_epoch_{task.score}"]),
            epochs=int(r["epochs"]),
            stopped_early=r["stopped_early"] == "True",
        )
    return rows
