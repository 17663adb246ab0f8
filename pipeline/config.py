"""The typed schema of ``params.yaml``: validated once, up front, by every stage.

Unknown keys, wrong types and out-of-range values are errors that name the key path
(``train.lr``, ``models.variants.full_attention.kernel_size``) and what is allowed. What costs
more than reading the file (building every variant or every architecture the sweep can produce,
importing Lightning to know its strategies) is checked only for the stages that need it:
``load_config(path, builds=...)``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
import itertools
import math
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

import sasa
from pipeline.locations import redact
from sasa.models.registry import check_model
from sasa.models.resnet import RESNETS


class ConfigError(Exception):
    """A bad ``params.yaml``; the message names the key path, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Literal["mnist5k", "imagefolder", "cifar10"] = "mnist5k"
    path: Optional[str] = Field(None, description="dataset folder for imagefolder / cifar10")
    on_bad_file: Literal["fail", "skip"] = Field("fail", description="prepare: stop on unreadable files, or leave them out")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="mnist5k: stratified hold-out share")
    seed: int = 0
    resolution: PositiveInt = 28
    hflip: bool = True
    num_workers: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _path_has_a_source(self):
        if self.source == "mnist5k" and self.path is not None:
            raise ValueError(
                f"data.path={self.path!r} is set but data.source is mnist5k, which ignores it (it trains on the bundled digits): "
                "set data.source to imagefolder or cifar10 to use the folder, or set data.path: null"
            )
        return self


class ArchConfig(_Section):
    """Keyword arguments of ``sasa.create_model``; ``None`` means the model's default. The ResNets
    take theirs as keys of their own (form, stem, ..., the keys ``models.common`` shares); every other
    model (``timm:NAME``, ``cvt13``) takes all of its options in ``model_args``."""

    model: Optional[str] = Field(None, description="resnet26 | resnet38 | resnet50 | cvt13 | cvt21 | timm:NAME")
    form: Optional[str] = None
    stem: Optional[str] = None
    attention_groups: Optional[list[int]] = None
    kernel_size: Optional[int] = None
    heads: Optional[int] = None
    pos_enc: Optional[str] = None
    width: Optional[float] = None
    small_input: Optional[bool] = None
    zero_init_residual: Optional[bool] = None
    mixer: Optional[str] = Field(None, description="what fills the attention groups: sasa, halo, bot, ... (sasa.layers.MIXERS)")
    mixer_args: Optional[dict[str, Any]] = Field(None, description="the mixer's own options, e.g. {block_size: 4, halo: 1}")
    block_attention: Optional[str] = Field(None, description="se | eca | cbam | gc: a module after every block's last batch norm")
    model_args: Optional[dict[str, Any]] = Field(None, description="a non-ResNet model's options, e.g. timm's {img_size: 20, patch_size: 4}")

    @property
    def model_name(self) -> str:
        return self.model or "resnet26"

    @property
    def is_resnet(self) -> bool:
        return self.model_name in RESNETS

    def resnet_keys_set(self) -> list[str]:
        return [k for k in RESNET_KEYS if getattr(self, k) is not None]

    @property
    def form_name(self) -> str:
        return self.form or "conv"

    @property
    def mixer_name(self) -> str:
        return self.mixer or "sasa"

    def merged_over(self, base: "ArchConfig") -> "ArchConfig":
        """This variant over ``models.common``; a non-ResNet variant takes only its own keys (common's
        are the ResNets')."""
        if self.model is not None and self.model not in RESNETS:
            return self
        return base.model_copy(update=self.model_dump(exclude_none=True))

    def build(self, num_classes: int, in_chans: int):
        check_model(self.model_name)
        if self.is_resnet:
            if self.model_args is not None:
                raise ValueError(f"model_args is for non-ResNet models; {self.model_name} takes its options as keys ({', '.join(RESNET_KEYS)})")
            kwargs = self.model_dump(exclude_none=True, exclude={"model"})
        else:
            if self.resnet_keys_set():
                raise ValueError(f"{', '.join(self.resnet_keys_set())}: ResNet keys; {self.model_name} takes its options in model_args")
            kwargs = dict(self.model_args or {})
        return sasa.create_model(self.model_name, num_classes=num_classes, in_chans=in_chans, **kwargs)


RESNET_KEYS = tuple(k for k in ArchConfig.model_fields if k not in ("model", "model_args"))


class ModelsConfig(_Section):
    common: ArchConfig = ArchConfig()
    variants: dict[str, ArchConfig]

    @field_validator("variants")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("define at least one variant")
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"variant name {name!r} may use letters, digits, '_' and '-' only")
        return v

    def resolved(self, variant: str) -> ArchConfig:
        return self.variants[variant].merged_over(self.common)


class TrainConfig(_Section):
    epochs: PositiveInt = 4
    batch_size: PositiveInt = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="peak learning rate (after warm-up)")
    lr_reference_batch: Optional[PositiveInt] = Field(None, description="lr is per this many images, scaled to the global batch")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-5, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="EMA of weights; null disables")
    bn_decay: Optional[float] = Field(None, gt=0, lt=1, description="batch-norm running-average decay (paper: 0.9999); null: PyTorch's 0.9")
    sync_batchnorm: bool = Field(False, description="batch-norm statistics over all devices (DDP)")
    seeds: list[int] = Field([0], min_length=1, description="one run per seed; the report gives mean and 95% interval over them")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: Union[PositiveInt, Literal["auto"]] = 1
    num_nodes: PositiveInt = 1
    strategy: str = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    limit_train_batches: Union[PositiveInt, float] = Field(1.0, gt=0, description="batch count, or a fraction <= 1")
    limit_val_batches: Union[PositiveInt, float] = Field(1.0, gt=0, description="batch count, or a fraction <= 1")
    progress_bar: bool = True
    compile: bool = Field(False, description="torch.compile the model (fuses the layers around the attention op)")
    channels_last: bool = Field(True, description="NHWC weights and activations: faster convolutions on CPUs and GPUs")
    checkpoint_dir: str = Field("checkpoints", min_length=1, description="folder or fsspec URL every node shares")

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


# Where and how visibly runs train, not what they compute: left out of every fingerprint and of the
# stages' DVC params (dvc.yaml), so changing one re-runs nothing. The report reads mlflow.*.
RUNTIME_KEYS = frozenset({
    "data.num_workers", "train.progress_bar", "train.checkpoint_dir", "mlflow.tracking_uri", "mlflow.experiment",
    "sweep.address", "sweep.storage_path", "sweep.max_concurrent_trials", "sweep.resources.cpu", "sweep.max_failures",
})


def runtime_keys(section: str) -> set[str]:
    """The run-time keys directly in one section (``data`` -> {"num_workers"})."""
    return {key.split(".", 1)[1] for key in RUNTIME_KEYS if key.startswith(f"{section}.") and key.count(".") == 1}


RUNTIME_TRAIN_KEYS = runtime_keys("train")
# a run's recipe: everything in train but these (a run has one seed of the list)
NOT_RECIPE_KEYS = RUNTIME_TRAIN_KEYS | {"seeds"}


TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")  # SQLAlchemy dialects and servers


class MlflowConfig(_Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="sqlite:///FILE, another SQLAlchemy database URI or http(s)://SERVER")
    experiment: str = Field("sasa", min_length=1)

    @field_validator("tracking_uri")
    @classmethod
    def _supported_store(cls, v):
        scheme = v.split("://", 1)[0].split("+", 1)[0] if "://" in v else ""
        if v == "databricks" or (scheme in TRACKING_SCHEMES and (scheme != "sqlite" or v.startswith("sqlite:///"))):
            return v
        raise ValueError(
            "use a database URI (sqlite:///FILE, postgresql://, mysql://, mssql://, with an optional +driver) or an MLflow "
            "server (http(s)://HOST:PORT, databricks); a folder path or file:// URI would be MLflow's file store, which MLflow 3 refuses"
        )


class ReportConfig(_Section):
    label_points: bool = True


SAMPLERS = ("choice", "uniform", "loguniform", "randint")
ARCH_KEYS = tuple(k for k in ArchConfig.model_fields if k != "model")
MODEL_ARG_PREFIX = "model_args."  # sweep.space: model_args.patch_size sweeps one option of a non-ResNet model


def is_arch_key(key: str) -> bool:
    return key in ARCH_KEYS or (key.startswith(MODEL_ARG_PREFIX) and len(key) > len(MODEL_ARG_PREFIX))
TRAIN_KEYS = tuple(k for k in TrainConfig.model_fields if k != "seeds")  # seeds repeat every trial, not a search axis


class SchedulerConfig(_Section):
    """ASHA stops the worse trials at rungs grace_period, grace_period x reduction_factor, ...;
    ``fifo`` runs every trial to the end."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(2.0, gt=1)


class ResourcesConfig(_Section):
    """What one trial holds. ``workers`` > 1 makes each trial a DDP run of that many Ray Train
    workers (``TorchTrainer``), each with ``cpu`` CPUs and ``gpu`` GPUs."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    workers: PositiveInt = 1


class SweepConfig(_Section):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_-]+$")
    address: Optional[str] = Field(None, description="Ray cluster to join; RAY_ADDRESS wins; null starts a local runtime")
    storage_path: str = Field("sweep/ray", description="shared folder or cloud URI (s3://, gs://) for trial checkpoints")
    base: str = Field(..., description="the models.variants key every trial starts from")
    space: dict[str, Union[list, dict[str, Any]]] = Field(..., description="key -> grid list or {sampler: args}")
    num_samples: PositiveInt = 1
    metric: Literal["val_top1", "val_loss"] = "val_top1"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = SchedulerConfig()
    train: dict[str, Any] = Field(default_factory=dict, description="train.* overrides for trials (e.g. fewer epochs)")
    max_concurrent_trials: Optional[PositiveInt] = None
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
                raise ValueError(f"{key!r} cannot be swept{hint}; allowed: {', '.join(ARCH_KEYS + TRAIN_KEYS)}, {MODEL_ARG_PREFIX}NAME")
            if isinstance(spec, list):
                if not spec:
                    raise ValueError(f"{key}: an empty grid")
                continue
            if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(f"{key}: give a list (grid) or exactly one of {', '.join(SAMPLERS)}, e.g. {{choice: [3, 5]}}")
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
        wanted = {"val_top1": "max", "val_loss": "min"}[self.metric]
        if self.mode != wanted:
            raise ValueError(f"sweep.mode={self.mode!r} would pick the worst trial by {self.metric}; use mode: {wanted}")
        return self

    def trial_count(self, seeds: int) -> int:
        """How many trials the sweep runs: every grid combination and seed, ``num_samples`` times (an
        interrupted Tune run only knows the trials it has generated so far)."""
        return seeds * self.num_samples * math.prod(len(spec) for spec in self.space.values() if isinstance(spec, list))

    def discrete_values(self, key) -> list:
        """The values a grid or choice key can take; empty for continuous samplers."""
        spec = self.space[key]
        return spec if isinstance(spec, list) else spec.get("choice", [])


class Config(_Section):
    """Every section is required: DVC tracks each one as a stage parameter."""

    data: DataConfig
    models: ModelsConfig
    train: TrainConfig
    mlflow: MlflowConfig
    report: ReportConfig
    sweep: SweepConfig

    @model_validator(mode="after")
    def _sweep_fits_the_rest(self):
        if self.sweep.base not in self.models.variants:
            raise ValueError(f"sweep.base={self.sweep.base!r} is not in models.variants; defined: {', '.join(self.models.variants)}")
        try:
            epochs = self.trial_train().epochs
            for key in self.sweep.space.keys() & set(TRAIN_KEYS):
                for value in self.sweep.discrete_values(key):
                    self.trial_train({key: value})
        except ValidationError as err:
            raise ValueError(f"sweep: a trial's train values are invalid:\n{_format(err)}") from None
        if self.sweep.scheduler.grace_period > epochs:
            raise ValueError(f"sweep.scheduler.grace_period={self.sweep.scheduler.grace_period} exceeds the trials' {epochs} epochs")
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
                arch["model_args"] = {**(arch["model_args"] or {}), key[len(MODEL_ARG_PREFIX):]: value}
            else:
                arch[key] = value
        return ArchConfig.model_validate(arch)

    def sweep_fingerprint(self) -> str:
        """Hash of everything that determines the sweep's trials; a change starts a new sweep."""
        payload = {
            "base": self.models.resolved(self.sweep.base).model_dump(),
            "train": self.trial_train().model_dump(exclude=RUNTIME_TRAIN_KEYS),
            "data": self.data.model_dump(exclude=runtime_keys("data")),
            "sweep": self.sweep.model_dump(exclude={"address", "storage_path", "max_concurrent_trials", "resources", "max_failures"}),
        }
        return _hash(payload)

    def recipe(self, train: TrainConfig) -> str:
        """Hash of how a run trains (data and train, not the seed): runs of one recipe are comparable,
        whatever their architecture and whichever stage trained them."""
        return _hash({"train": train.model_dump(exclude=NOT_RECIPE_KEYS), "data": self.data.model_dump(exclude=runtime_keys("data"))})

    def fingerprint(self, variant: str, seed: int) -> str:
        """Hash of everything that determines one training run of a variant (not where it is tracked)."""
        return _hash({"arch": self.models.resolved(variant).model_dump(), "recipe": self.recipe(self.train), "seed": seed})


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        value = redact(e["input"]) if isinstance(e["input"], str) else e["input"]  # a URI's password stays out of logs
        got = "" if e["type"] == "missing" else f" (got {value!r})"
        msg = "unknown key; remove it or check its spelling" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {path}: {msg}{got}")
    return "\n".join(lines)


def _resolution_error(model, resolution: int) -> str | None:
    """Why ``model`` cannot take ``resolution`` px images, or None. The ResNets know their minimum;
    other models (fixed image sizes, windows that must divide the maps) are tried on one image."""
    if hasattr(model, "min_input_size"):
        if resolution < model.min_input_size:
            return f"it needs at least {model.min_input_size} px (set models.common.small_input: true for 28-32 px images)"
        return None
    import torch

    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, model.in_chans, resolution, resolution))
    except (AssertionError, RuntimeError, ValueError) as err:
        return f"it fails on {resolution} px images ({str(err).strip() or type(err).__name__}); fit its size options in model_args (e.g. img_size)"
    return None


def _check_strategies(cfg: Config):
    """``train.strategy`` (and a sweep's) is one Lightning knows and this pipeline can run: the train
    stage agrees on resume across ranks before fit, so its processes must exist before fit (re-run
    by Lightning's launcher, as ddp does, or started by torchrun / srun), not spawned by fit."""
    from lightning.pytorch.strategies import StrategyRegistry

    allowed = ["auto", *(s for s in StrategyRegistry.available_strategies() if not s.endswith(("spawn", "fork", "notebook")))]
    for key, train in (("train", cfg.train), ("sweep.train", cfg.trial_train())):
        if train.strategy not in allowed:
            raise ConfigError(f"{key}.strategy={train.strategy!r}: unknown or unsupported strategy; allowed: {', '.join(allowed)}")


def _check_variants(cfg: Config):
    """Build every variant once so architecture errors surface before any data or training work."""
    for name in cfg.models.variants:
        arch = cfg.models.resolved(name)
        try:
            model = arch.build(num_classes=10, in_chans=3)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"models.variants.{name}: {err}") from None
        why = _resolution_error(model, cfg.data.resolution)
        if why:
            raise ConfigError(f"data.resolution={cfg.data.resolution} does not fit models.variants.{name}: {why}")


def _check_sweep(cfg: Config):
    """Build every architecture the sweep's grid and choices can produce, before Ray starts."""
    keys = [k for k in cfg.sweep.space if is_arch_key(k)]
    for values in itertools.product(*(cfg.sweep.discrete_values(k) for k in keys)):
        overrides = dict(zip(keys, values))
        try:
            model = cfg.trial_arch(overrides).build(num_classes=10, in_chans=3)
        except (ValueError, TypeError) as err:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"sweep.space {overrides}: {err}") from None
        why = _resolution_error(model, cfg.data.resolution)
        if why:
            raise ConfigError(f"sweep.space {overrides}: data.resolution={cfg.data.resolution} does not fit: {why}")


BUILDS = {"variants": _check_variants, "sweep": _check_sweep}  # what a stage may ask to be built up front
EVERYTHING = tuple(BUILDS)


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
    if builds:
        _check_strategies(cfg)
    for name in builds:
        BUILDS[name](cfg)
    return cfg
