"""The schema of ``params.yaml``'s ``models`` section: an architecture, as ``sasa.create_model``'s
keyword arguments, and the variants that share ``models.common``. The one part of the schema that
asks ``sasa`` (which models are ResNets, which exist, and building one).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

import sasa
from sasa.models.registry import check_model, is_resnet


class Section(BaseModel):
    """A section of ``params.yaml`` (or a part of one): unknown keys are errors, values read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchConfig(Section):
    """Keyword arguments of ``sasa.create_model``; ``None`` means the model's default. The ResNets
    take theirs as keys of their own (form, stem, ..., the keys ``models.common`` shares); every other
    model (``timm:NAME``, ``cvt13``) takes all of its options in ``model_args``."""

    model: str | None = Field(None, description="resnet26 | resnet38 | resnet50 | cvt13 | cvt21 | timm:NAME")
    form: str | None = None
    stem: str | None = None
    attention_groups: list[int] | None = None
    kernel_size: int | None = None
    heads: int | None = None
    pos_enc: str | None = None
    width: float | None = None
    small_input: bool | None = None
    zero_init_residual: bool | None = None
    mixer: str | None = Field(
        None, description="what fills the attention groups: sasa, halo, bot, ... (sasa.layers.MIXERS)"
    )
    mixer_args: dict[str, Any] | None = Field(
        None, description="the mixer's own options, e.g. {block_size: 4, halo: 1}"
    )
    block_attention: str | None = Field(
        None, description="se | eca | cbam | gc: a module after every block's last batch norm"
    )
    model_args: dict[str, Any] | None = Field(
        None, description="a non-ResNet model's options, e.g. timm's {img_size: 20, patch_size: 4}"
    )

    @property
    def model_name(self) -> str:
        return self.model or "resnet26"

    @property
    def is_resnet(self) -> bool:
        return is_resnet(self.model_name)

    def resnet_keys_set(self) -> list[str]:
        return [k for k in RESNET_KEYS if getattr(self, k) is not None]

    @property
    def form_name(self) -> str:
        return self.form or "conv"

    @property
    def mixer_name(self) -> str:
        return self.mixer or "sasa"

    def merged_over(self, base: ArchConfig) -> ArchConfig:
        """This variant over ``models.common``; a non-ResNet variant takes only its own keys (common's
        are the ResNets')."""
        if self.model is not None and not is_resnet(self.model):
            return self
        return base.model_copy(update=self.model_dump(exclude_none=True))

    def build(self, num_classes: int, in_chans: int):
        check_model(self.model_name, task="classification")  # the pipeline trains classifiers
        if self.is_resnet:
            if self.model_args is not None:
                raise ValueError(
                    f"model_args is for non-ResNet models; "
                    f"{self.model_name} takes its options as keys ({', '.join(RESNET_KEYS)})"
                )
            kwargs = self.model_dump(exclude_none=True, exclude={"model"})
        else:
            if self.resnet_keys_set():
                raise ValueError(
                    f"{', '.join(self.resnet_keys_set())}: ResNet keys; "
                    f"{self.model_name} takes its options in model_args"
                )
            kwargs = dict(self.model_args or {})
        return sasa.create_model(self.model_name, num_classes=num_classes, in_chans=in_chans, **kwargs)


RESNET_KEYS = tuple(k for k in ArchConfig.model_fields if k not in ("model", "model_args"))


class ModelsConfig(Section):
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


ARCH_KEYS = tuple(k for k in ArchConfig.model_fields if k != "model")
MODEL_ARG_PREFIX = "model_args."  # sweep.space: model_args.patch_size sweeps one option of a non-ResNet model


def is_arch_key(key: str) -> bool:
    return key in ARCH_KEYS or (key.startswith(MODEL_ARG_PREFIX) and len(key) > len(MODEL_ARG_PREFIX))
