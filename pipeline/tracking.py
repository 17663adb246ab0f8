"""MLflow conventions of the project: where runs go, and what every training run carries.

Train runs and sweep trials are written by different code (a Lightning logger, a Tune callback)
but carry the same things, so they line up in the MLflow UI's table and compare view and the report
can pool them: one parameter flattening (``data/*``, ``arch/*``, ``train/*``, ``resolved/*``), one
step axis (epochs completed), the same summary metrics (``top1``, ``top5``, ``num_params``,
``macs``, ``flops``), readable names, filterable tags (``sasa.form``, ``sasa.mixer``, ``sasa.stem``,
``sasa.k``, ``dvc.exp``) and the dataset as a run input.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Param
from mlflow.exceptions import MlflowException

from pipeline.config import Config
from pipeline.locations import resolve_tracking_uri
from sasa.models.registry import model_task

# The MLflow 3 UI opens an experiment of this kind on its runs (a GenAI one on its traces overview).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` wins over ``mlflow.tracking_uri`` (e.g. a shared server on a cluster);
    a relative SQLite file is the project root's, also from a temporary DVC experiment."""
    return resolve_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Beside a SQLite file: MLflow's default (``./mlruns`` of whichever process creates the
    experiment) would be inside a temporary experiment's copy. A server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
    return folder.as_uri()


def experiment_id(client: MlflowClient, cfg: Config) -> str:
    """The id of ``mlflow.experiment``, created on first use, marked as model training."""
    name = cfg.mlflow.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name, artifact_location=_artifact_location(tracking_uri(cfg), name), tags=EXPERIMENT_TAGS
        )
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:  # an experiment made by an older version of the pipeline
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def run_in_experiment(client: MlflowClient, run_id: str, experiment_id: str) -> bool:
    """Whether a run recorded on disk can be continued: it still exists, in this experiment."""
    try:
        return client.get_run(run_id).info.experiment_id == experiment_id
    except MlflowException:  # e.g. the tracking store was deleted or replaced
        return False


def context_tags() -> dict[str, str]:
    """Where a run came from: the git commit of its code and, under ``dvc exp run``, the DVC
    experiment's name and baseline commit (``tags.`dvc.exp` = 'NAME'`` finds its runs)."""
    tags = {}
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            tags["mlflow.source.git.commit"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    for tag, variable in (("dvc.exp", "DVC_EXP_NAME"), ("dvc.baseline", "DVC_EXP_BASELINE_REV")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def flatten(values: dict, prefix: str) -> dict[str, str]:
    """Nested settings as MLflow params ``PREFIX/KEY/SUBKEY``; values as JSON (``null``, ``[3, 4]``,
    ``true``), strings as they are."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def resolved_architecture(model, model_name: str) -> dict:
    """What a run's network is, every default filled in (``model.config``), without the data's class
    and channel counts or ``form`` (a shorthand for stem and attention groups): two runs with equal
    resolved architectures trained the same network, whatever they were called."""
    config = getattr(model, "config", {})
    return {"model": model_name, **{k: v for k, v in config.items() if k not in ("num_classes", "in_chans", "form")}}


def run_params(cfg: Config, arch, train, seed: int, model) -> dict[str, str]:
    """Every training run's params: the data section, the architecture as configured (``arch/*``) and
    resolved (``resolved/*``, JSON values the report reads back), the train section with its seed."""
    resolved = resolved_architecture(model, arch.model_name)
    return {
        **flatten(cfg.data.model_dump(), "data"),
        **flatten(arch.model_dump(), "arch"),
        **flatten({**train.model_dump(exclude={"seeds"}), "seed": seed}, "train"),
        **{f"resolved/{k}": json.dumps(v) for k, v in resolved.items()},
    }


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]):
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_CALL])


def run_identity(model, model_name: str, recipe: str, seed: int) -> dict[str, str]:
    """Tags every training run carries, variant or sweep trial: the report pools runs by ``sasa.arch``
    (a hash of the resolved architecture) within one ``sasa.recipe``, and pairs them by ``sasa.seed``;
    users filter by ``sasa.form``, ``sasa.mixer``, ``sasa.stem`` and ``sasa.k`` (set only where
    attention layers use it)."""
    arch = resolved_architecture(model, model_name)
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    tags = {
        "sasa.arch": digest,
        "sasa.recipe": recipe,
        "sasa.seed": str(seed),
        "sasa.model": model_name,
        "sasa.task": model_task(model_name),
        "sasa.form": getattr(model, "config", {}).get("form", ""),
        "sasa.mixer": arch.get("mixer", ""),
        "sasa.stem": arch.get("stem", ""),
    }
    if arch.get("attention_groups") and "kernel_size" in arch:
        tags["sasa.k"] = str(arch["kernel_size"])
    return tags


def count_metrics(counts) -> dict[str, float]:
    """A model's counts as run metrics (``num_params``: the UI's Params tab is something else)."""
    return {"num_params": counts.params, "macs": counts.macs, "flops": counts.flops}


def log_dataset(client: MlflowClient, run_id: str, source: str, prepared: str | Path):
    """The prepared splits as the run's dataset inputs (the UI's Dataset column), each with a digest
    of its files: runs that show the same digest trained on the same images."""
    prepared = Path(prepared)
    meta = json.loads((prepared / "meta.json").read_text())
    origin = json.dumps({"uri": meta.get("root") or str(prepared.resolve())})  # an image folder's own path
    inputs = []
    for split in ("train", "val"):
        digest = hashlib.sha256()
        for path in sorted(prepared.glob(f"{split}.*")):
            digest.update(path.read_bytes())
        dataset = Dataset(
            f"{source}-{split}",
            digest.hexdigest()[:12],
            source_type="local",
            source=origin,
            profile=json.dumps({"num_images": meta["counts"][split], "num_classes": meta["num_classes"]}),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)]))
    client.log_inputs(run_id, datasets=inputs)


def start_training_run(
    client: MlflowClient,
    experiment_id: str,
    cfg: Config,
    name: str,
    tags: dict,
    arch,
    train,
    seed: int,
    model,
    prepared: str | Path,
) -> str:
    """A new training run, a variant's seed or a sweep trial, carrying what every one carries: ``tags``
    with its identity and context tags, its params and its dataset. Returns its id."""
    tags = {**tags, **run_identity(model, arch.model_name, cfg.recipe(train), seed), **context_tags()}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    log_params(client, run_id, run_params(cfg, arch, train, seed, model))
    log_dataset(client, run_id, cfg.data.source, prepared)
    return run_id


def _requirements(model) -> list[str]:
    """What loading the pickled model needs besides the ``sasa`` code: torch, and timm for its models."""
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    if "family" in getattr(model, "config", {}):
        import timm

        reqs.append(f"timm=={timm.__version__}")
    return reqs


def log_model(uri: str, run_id: str, model, example):
    """The trained network as the run's MLflow model ``model``, with its signature and an input
    example (none for a detector, whose input is a list of images):
    ``mlflow.pytorch.load_model("runs:/RUN_ID/model")`` gives it back, anywhere with torch, since the
    ``sasa`` package travels with it."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    import sasa

    model = copy.deepcopy(model).cpu().eval()
    signature = None
    if example is not None:
        with torch.no_grad():
            signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):  # ends FINISHED, as the run already is
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            code_paths=[str(Path(sasa.__file__).parent)],
            pip_requirements=_requirements(model),
            serialization_format="pickle",  # any batch size; MLflow's default, torch.export, fixes it to the example's
        )
