"""The typed schema of ``params.yaml``: validated once, up front, by every stage.

Unknown keys, wrong types and out-of-range values are errors that name the key path
(``train.lr``, ``models.variants.full_attention.kernel_size``) and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

import sasa


class ConfigError(Exception):
    """A bad ``params.yaml``; the message names the key path, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Literal["mnist5k", "imagefolder", "cifar10"] = "mnist5k"
    path: Optional[str] = Field(None, description="dataset folder for imagefolder / cifar10")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="mnist5k: stratified hold-out share")
    seed: int = 0
    resolution: PositiveInt = 28
    hflip: bool = True
    num_workers: int = Field(2, ge=0)


class ArchConfig(_Section):
    """Keyword arguments of ``sasa.create_model``; ``None`` means the model's default."""

    model: Optional[str] = None
    form: Optional[str] = None
    stem: Optional[str] = None
    attention_groups: Optional[list[int]] = None
    kernel_size: Optional[int] = None
    heads: Optional[int] = None
    pos_enc: Optional[str] = None
    width: Optional[float] = None
    small_input: Optional[bool] = None
    zero_init_residual: Optional[bool] = None

    @property
    def model_name(self) -> str:
        return self.model or "resnet26"

    @property
    def form_name(self) -> str:
        return self.form or "conv"

    def merged_over(self, base: "ArchConfig") -> "ArchConfig":
        return base.model_copy(update=self.model_dump(exclude_none=True))

    def build(self, num_classes: int, in_chans: int):
        kwargs = self.model_dump(exclude_none=True, exclude={"model"})
        return sasa.create_model(self.model_name, num_classes=num_classes, in_chans=in_chans, **kwargs)


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
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-5, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="EMA of weights; null disables")
    seed: int = 0
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: Union[PositiveInt, Literal["auto"]] = 1
    num_nodes: PositiveInt = 1
    strategy: str = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    limit_train_batches: Union[PositiveInt, float] = Field(1.0, gt=0, description="batch count, or a fraction <= 1")
    limit_val_batches: Union[PositiveInt, float] = Field(1.0, gt=0, description="batch count, or a fraction <= 1")
    progress_bar: bool = True

    @field_validator("limit_train_batches", "limit_val_batches")
    @classmethod
    def _fraction_at_most_one(cls, v):
        if isinstance(v, float) and v > 1:
            raise ValueError("a fraction must be at most 1.0 (or give a whole number of batches)")
        return v

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v):
        from lightning.pytorch.strategies import StrategyRegistry

        allowed = ["auto", *StrategyRegistry.available_strategies()]
        if v not in allowed:
            raise ValueError(f"unknown strategy; allowed: {', '.join(allowed)}")
        return v

    @model_validator(mode="after")
    def _warmup_within_training(self):
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"train.warmup_epochs={self.warmup_epochs} exceeds train.epochs={self.epochs}")
        return self


class MlflowConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "sasa"

    @field_validator("tracking_uri")
    @classmethod
    def _supported_store(cls, v):
        if not v.startswith(("sqlite:///", "http://", "https://", "databricks")):
            raise ValueError("use a sqlite:///FILE or http(s)://SERVER tracking URI (MLflow 3 refuses the ./mlruns file store)")
        return v


class ReportConfig(_Section):
    label_points: bool = True


class Config(_Section):
    """Every section is required: DVC tracks each one as a stage parameter."""

    data: DataConfig
    models: ModelsConfig
    train: TrainConfig
    mlflow: MlflowConfig
    report: ReportConfig

    def fingerprint(self, variant: str) -> str:
        """Hash of everything that determines a variant's training run (not where it is tracked)."""
        payload = {
            "arch": self.models.resolved(variant).model_dump(),
            "train": self.train.model_dump(exclude={"progress_bar"}),
            "data": self.data.model_dump(exclude={"num_workers"}),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        msg = "unknown key; remove it or check its spelling" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {path}: {msg}{got}")
    return "\n".join(lines)


def _check_variants(cfg: Config):
    """Build every variant once so architecture errors surface before any data or training work."""
    for name in cfg.models.variants:
        arch = cfg.models.resolved(name)
        try:
            model = arch.build(num_classes=10, in_chans=3)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"models.variants.{name}: {err}") from None
        if cfg.data.resolution < model.min_input_size:
            raise ConfigError(
                f"data.resolution={cfg.data.resolution} is too small for models.variants.{name}: it needs at least "
                f"{model.min_input_size} (set models.common.small_input: true for 28-32 px images)"
            )


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such parameters file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, models, train, mlflow, report)")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: invalid parameters\n{_format(err)}") from None
    _check_variants(cfg)
    return cfg
