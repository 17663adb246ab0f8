"""The typed schema of ``params.yaml``: the whole file validated once, up front, by every stage.

Unknown keys, wrong types and out-of-range values are errors that name the key path
(``train.lr``, ``models.variants.full_attention.kernel_size``) and what is allowed. Every variant
and every architecture the sweep can produce is built on the meta device (``pipeline.build_checks``)
by every stage, so a bad value anywhere stops the first stage that runs, before it writes anything;
tests that need only the schema pass ``builds=()``. The ``models`` section's schema is
``pipeline.arch_config``; which keys identify a run, and its fingerprints, ``pipeline.identity``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from pipeline import identity
from pipeline.arch_config import (
    ARCH_KEYS,
    MODEL_ARG_PREFIX,
    ArchConfig,
    ModelsConfig,
    Section,
    is_arch_key,
    models_for,
)
from pipeline.locations import redact
from pipeline.tasks import SOURCES, TASKS, task_of_source


class ConfigError(Exception):
    """A bad ``params.yaml``; the message names the key path, the value and what is allowed."""


class CanvasConfig(Section):
    """``digit_canvases``: the bundled digits composed into detection canvases (``pipeline.digit_canvases``)."""

    size: PositiveInt = Field(128, description="canvas side, px")
    train: PositiveInt = Field(2000, description="training canvases, from the training split's digits")
    val: PositiveInt = Field(500, description="validation canvases, from the held-out digits")
    digits_per_canvas: tuple[PositiveInt, PositiveInt] = (1, 5)
    digit_sizes: tuple[PositiveInt, PositiveInt] = Field((12, 64), description="a digit's drawn size, px")
    max_iou: float = Field(0.1, ge=0, le=1, description="the most two digits' boxes may overlap")

    @model_validator(mode="after")
    def _ranges(self):
        for key in ("digits_per_canvas", "digit_sizes"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"data.canvas.{key}: [low, high] with low <= high; got [{low}, {high}]")
        if self.digit_sizes[1] > self.size:
            raise ValueError(f"data.canvas.digit_sizes: {self.digit_sizes[1]} px exceeds the {self.size} px canvas")
        return self


class CocoConfig(Section):
    """``coco``: ``data.path/annotations/instances_SPLIT.json`` with its images in ``data.path/SPLIT/``."""

    train: str = Field("train2017", min_length=1)
    val: str = Field("val2017", min_length=1)


FOLDER_SOURCES = ("imagefolder", "cifar10", "coco")  # the sources read from data.path


class DataConfig(Section):
    source: Literal[SOURCES] = "mnist5k"
    path: str | None = Field(None, description="dataset folder for imagefolder / cifar10 / coco")
    on_bad_file: Literal["fail", "skip"] = Field(
        "fail", description="prepare: stop on unreadable files, or leave them out"
    )
    val_fraction: float = Field(0.2, gt=0, lt=1, description="mnist5k: stratified hold-out share")
    seed: int = 0
    resolution: PositiveInt = 28
    hflip: bool = True
    num_workers: int = Field(2, ge=0)
    canvas: CanvasConfig = CanvasConfig()
    coco: CocoConfig = CocoConfig()

    @model_validator(mode="after")
    def _path_has_a_source(self):
        if self.source not in FOLDER_SOURCES and self.path is not None:
            raise ValueError(
                f"data.path={self.path!r} is set but data.source is {self.source}, which ignores it "
                "(it is made from the bundled digits): "
                f"set data.source to one of {', '.join(FOLDER_SOURCES)} to use the folder, or set data.path: null"
            )
        return self

    @property
    def task(self):
        """The task this source feeds (``pipeline.tasks``)."""
        return task_of_source(self.source)

    def unread_sections(self) -> tuple[str, ...]:
        """The sub-sections this source does not read: they change none of its results."""
        return tuple(key for key, source in (("canvas", "digit_canvases"), ("coco", "coco")) if self.source != source)


# Lightning's registered strategies whose processes exist before fit: the train stage agrees on resume
# across ranks before fit, so they are re-run by Lightning's launcher (ddp) or started by torchrun /
# srun, never spawned by fit (*_spawn, *_fork, *_notebook). Listed here so that checking a name does
# not import Lightning; tests/pipeline/test_config.py compares it with Lightning's registry.
STRATEGIES = (
    "auto",
    "ddp",
    "ddp_find_unused_parameters_false",
    "ddp_find_unused_parameters_true",
    "deepspeed",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme",
    "fsdp",
    "fsdp_cpu_offload",
    "single_device",
    "single_tpu",
    "single_xla",
    "xla",
    "xla_debug",
)


class TrainConfig(Section):
    epochs: PositiveInt = 4
    batch_size: PositiveInt = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="peak learning rate (after warm-up)")
    lr_reference_batch: PositiveInt | None = Field(
        None, description="lr is per this many images, scaled to the global batch"
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-5, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of weights; null disables")
    bn_decay: float | None = Field(
        None, gt=0, lt=1, description="batch-norm running-average decay (paper: 0.9999); null: PyTorch's 0.9"
    )
    sync_batchnorm: bool = Field(False, description="batch-norm statistics over all devices (DDP)")
    seeds: list[int] = Field(
        [0], min_length=1, description="one run per seed; the report gives mean and 95% interval over them"
    )
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: PositiveInt | Literal["auto"] = 1
    num_nodes: PositiveInt = 1
    strategy: str = Field("auto", description="a Lightning strategy this pipeline can run (STRATEGIES)")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    limit_train_batches: PositiveInt | float = Field(1.0, gt=0, description="batch count, or a fraction <= 1")
    limit_val_batches: PositiveInt | float = Field(1.0, gt=0, description="batch count, or a fraction <= 1")
    progress_bar: bool = True
    compile: bool = Field(False, description="torch.compile the model (fuses the layers around the attention op)")
    channels_last: bool = Field(True, description="NHWC weights and activations: faster convolutions on CPUs and GPUs")
    checkpoint_dir: str = Field("checkpoints", min_length=1, description="folder or fsspec URL every node shares")

    @field_validator("strategy")
    @classmethod
    def _runnable_strategy(cls, v):
        if v not in STRATEGIES:
            raise ValueError(f"unknown or unsupported strategy; allowed: {', '.join(STRATEGIES)}")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"each seed once; got {v}")
        return v

    @field_validator("limit_train_batches", "limit_val_batches")
    @classmethod
    def _fraction_at_most_one(cls, v):
        if isinstance(v, float) and v > 1:
            raise ValueError("a fraction must be at most 1.0 (or give a whole number of batches)")
        return v

    @model_validator(mode="after")
    def _warmup_within_training(self):
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"train.warmup_epochs={self.warmup_epochs} exceeds train.epochs={self.epochs}")
        return self


# SQLAlchemy dialects and servers
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


class MlflowConfig(Section):
    tracking_uri: str = Field(
        "sqlite:///mlflow.db", description="sqlite:///FILE, another SQLAlchemy database URI or http(s)://SERVER"
    )
    experiment: str = Field("sasa", min_length=1)

    @field_validator("tracking_uri")
    @classmethod
    def _supported_store(cls, v):
        scheme = v.split("://", 1)[0].split("+", 1)[0] if "://" in v else ""
        if v == "databricks" or (scheme in TRACKING_SCHEMES and (scheme != "sqlite" or v.startswith("sqlite:///"))):
            return v
        raise ValueError(
            "use a database URI (sqlite:///FILE, postgresql://, mysql://, mssql://, with an optional +driver) "
            "or an MLflow server (http(s)://HOST:PORT, databricks); a folder path or file:// URI would be "
            "MLflow's file store, which MLflow 3 refuses"
        )


class ReportConfig(Section):
    label_points: bool = True


SAMPLERS = ("choice", "uniform", "loguniform", "randint")

TRAIN_KEYS = tuple(k for k in TrainConfig.model_fields if k != "seeds")  # seeds repeat every trial, not a search axis


class SchedulerConfig(Section):
    """ASHA stops the worse trials at rungs grace_period, grace_period x reduction_factor, ...;
    ``fifo`` runs every trial to the end."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(2.0, gt=1)


class ResourcesConfig(Section):
    """What one trial holds. ``workers`` > 1 makes each trial a DDP run of that many Ray Train
    workers (``TorchTrainer``), each with ``cpu`` CPUs and ``gpu`` GPUs."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    workers: PositiveInt = 1


class SweepConfig(Section):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_-]+$")
    address: str | None = Field(None, description="Ray cluster to join; RAY_ADDRESS wins; null starts a local runtime")
    storage_path: str = Field(
        "sweep/ray", description="shared folder or cloud URI (s3://, gs://) for trial checkpoints"
    )
    base: str = Field(..., description="the models.variants key every trial starts from")
    space: dict[str, list | dict[str, Any]] = Field(..., description="key -> grid list or {sampler: args}")
    num_samples: PositiveInt = 1
    metric: Literal["val_top1", "val_map", "val_loss"] = "val_top1"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = SchedulerConfig()
    train: dict[str, Any] = Field(default_factory=dict, description="train.* overrides for trials (e.g. fewer epochs)")
    max_concurrent_trials: PositiveInt | None = None
    resources: ResourcesConfig = ResourcesConfig()
    max_failures: int = Field(2, ge=0, description="retries of a failed trial, from its last checkpoint")

    @field_validator("space")
    @classmethod
    def _known_keys_and_samplers(cls, space):
        if not space:
            raise ValueError("define at least one key to sweep")
        for key, spec in space.items():
            if not is_arch_key(key) and key not in TRAIN_KEYS:
                hint = " (every trial runs once per train.seeds)" if key in ("seed", "seeds") else ""
                raise ValueError(
                    f"{key!r} cannot be swept{hint}; "
                    f"allowed: {', '.join(ARCH_KEYS + TRAIN_KEYS)}, {MODEL_ARG_PREFIX}NAME"
                )
            if isinstance(spec, list):
                if not spec:
                    raise ValueError(f"{key}: an empty grid")
                continue
            if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(
                    f"{key}: give a list (grid) or exactly one of {', '.join(SAMPLERS)}, e.g. {{choice: [3, 5]}}"
                )
            sampler, args = next(iter(spec.items()))
            if sampler == "choice" and not (isinstance(args, list) and args):
                raise ValueError(f"{key}: choice takes a non-empty list")
            if sampler != "choice" and not (isinstance(args, list) and len(args) == 2):
                raise ValueError(f"{key}: {sampler} takes [low, high]")
            if is_arch_key(key) and sampler != "choice":
                raise ValueError(f"{key}: architecture keys take a list or choice, not {sampler}")
        return space

    @model_validator(mode="after")
    def _mode_fits_metric(self):
        wanted = "min" if self.metric == "val_loss" else "max"
        if self.mode != wanted:
            raise ValueError(
                f"sweep.mode={self.mode!r} would pick the worst trial by {self.metric}; use mode: {wanted}"
            )
        return self

    def trial_count(self, seeds: int) -> int:
        """How many trials the sweep runs: every grid combination and seed, ``num_samples`` times (an
        interrupted Tune run only knows the trials it has generated so far)."""
        return seeds * self.num_samples * math.prod(len(spec) for spec in self.space.values() if isinstance(spec, list))

    def discrete_values(self, key) -> list:
        """The values a grid or choice key can take; empty for continuous samplers."""
        spec = self.space[key]
        return spec if isinstance(spec, list) else spec.get("choice", [])


class Config(Section):
    """Every section is required: DVC tracks each one as a stage parameter."""

    data: DataConfig
    models: ModelsConfig
    train: TrainConfig
    mlflow: MlflowConfig
    report: ReportConfig
    sweep: SweepConfig

    @model_validator(mode="after")
    def _models_fit_the_task(self):
        """Every variant is a model of the task the data feeds (a classifier on digits, a detector on
        canvases), and the sweep compares trials by a metric that task logs."""
        task = self.data.task
        for name in self.models.variants:
            arch = self.models.resolved(name)
            try:
                model_task = arch.task
            except ValueError:
                raise ValueError(
                    f"models.variants.{name}: model={arch.model_name!r} is not supported; data.source="
                    f"{self.data.source!r} feeds {task.name} models: {models_for(task.name)}"
                ) from None
            if model_task != task.name:
                other = next(t for t in TASKS.values() if t is not task)
                raise ValueError(
                    f"models.variants.{name}: {arch.model_name} is a {model_task} model, and data.source="
                    f"{self.data.source!r} feeds {task.name} models ({models_for(task.name)}); "
                    f"{other.name} models train on data.source {' | '.join(other.sources)}"
                )
        if self.sweep.metric not in task.sweep_metrics:
            raise ValueError(
                f"sweep.metric={self.sweep.metric!r}: {task.name} runs are compared by {' | '.join(task.sweep_metrics)}"
            )
        return self

    @model_validator(mode="after")
    def _sweep_fits_the_rest(self):
        if self.sweep.base not in self.models.variants:
            raise ValueError(
                f"sweep.base={self.sweep.base!r} is not in models.variants; defined: {', '.join(self.models.variants)}"
            )
        try:
            epochs = self.trial_train().epochs
            for key in self.sweep.space.keys() & set(TRAIN_KEYS):
                for value in self.sweep.discrete_values(key):
                    self.trial_train({key: value})
        except ValidationError as err:
            raise ValueError(f"sweep: a trial's train values are invalid:\n{_format(err)}") from None
        if self.sweep.scheduler.grace_period > epochs:
            raise ValueError(
                f"sweep.scheduler.grace_period={self.sweep.scheduler.grace_period} exceeds the trials' {epochs} epochs"
            )
        return self

    def params_file(self) -> dict:
        """The parameters as a complete ``params.yaml``: every key present (``dvc.yaml`` tracks keys
        one by one, and DVC stops on a missing one); unset architecture keys left out (``models.*``
        are tracked whole)."""
        params = self.model_dump()
        params["models"] = self.models.model_dump(exclude_none=True)
        return params

    def trial_train(self, overrides: dict | None = None) -> TrainConfig:
        """The train section with ``sweep.train`` and then a trial's own values applied, re-validated."""
        return TrainConfig.model_validate({**self.train.model_dump(), **self.sweep.train, **(overrides or {})})

    def trial_arch(self, overrides: dict) -> ArchConfig:
        """The base variant with a trial's architecture values (``model_args.NAME`` sets one model option)."""
        arch = self.models.resolved(self.sweep.base).model_dump()
        for key, value in overrides.items():
            if key.startswith(MODEL_ARG_PREFIX):
                arch["model_args"] = {**(arch["model_args"] or {}), key[len(MODEL_ARG_PREFIX) :]: value}
            else:
                arch[key] = value
        return ArchConfig.model_validate(arch)

    def sweep_fingerprint(self) -> str:
        """``pipeline.identity.sweep_fingerprint``: a change starts a new sweep."""
        return identity.sweep_fingerprint(self)

    def recipe(self, train: TrainConfig) -> str:
        """``pipeline.identity.recipe``: runs of one recipe are comparable."""
        return identity.recipe(self, train)

    def fingerprint(self, variant: str, seed: int) -> str:
        """``pipeline.identity.fingerprint``: what determines one training run of a variant."""
        return identity.fingerprint(self, variant, seed)


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a check across sections: its message names the keys, its input is the whole file
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        path = ".".join(str(p) for p in e["loc"])
        value = redact(e["input"]) if isinstance(e["input"], str) else e["input"]  # a URI's password stays out of logs
        got = "" if e["type"] == "missing" else f" (got {value!r})"
        msg = "unknown key; remove it or check its spelling" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {path}: {msg}{got}")
    return "\n".join(lines)


EVERYTHING = ("variants", "sweep")  # the builds of pipeline.build_checks


def load_config(path: str | Path = "params.yaml", builds: tuple[str, ...] = EVERYTHING) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such parameters file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return validate(raw, str(path), builds)


def validate(raw, source: str, builds: tuple[str, ...] = EVERYTHING) -> Config:
    """Parameters read from ``source``: the schema always; for each of ``builds`` (``variants``:
    every model of ``models.variants``, ``sweep``: every architecture the sweep's grid can produce)
    each model is built once, with the strategies checked, before any data or training work."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(Config.model_fields)})")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid parameters\n{_format(err)}") from None
    from pipeline.build_checks import run_builds  # which imports this module

    run_builds(cfg, builds)
    return cfg
