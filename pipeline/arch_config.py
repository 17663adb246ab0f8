"""The schema of ``params.yaml``'s ``models`` section: an architecture, as ``sasa.create_model``'s
keyword arguments, and the variants that share ``models.common``. The one part of the schema that
asks ``sasa`` (which models are ResNets, which exist, and building one).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

import sasa
from sasa.models.registry import check_model, is_resnet, list_models, model_task


class Section(BaseModel):
    """A section of ``params.yaml`` (or a part of one): unknown keys are errors, values read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchConfig(Section):
    """Keyword arguments of ``sasa.create_model``; ``None`` means the model's default. The ResNets
    and the detectors over them take theirs as keys of their own (form, stem, ..., the keys
    ``models.common`` shares; a detector also its ``DETECTOR_KEYS``); every other model
    (``timm:NAME``, ``cvt13``) takes all of its options in ``model_args``."""

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
    head_mixer: str | None = Field(
        None, description="detectors: what fills the FPN's and heads' 3x3 positions: conv (default), sasa, ..."
    )
    fpn_channels: int | None = Field(None, description="detectors: FPN and head width (RetinaNet: 256)")
    anchor_sizes: list[int] | None = Field(None, description="detectors: anchor side per level P3-P7, px")
    model_args: dict[str, Any] | None = Field(
        None, description="a non-ResNet model's options, e.g. timm's {img_size: 20, patch_size: 4}"
    )

    @property
    def model_name(self) -> str:
        return self.model or "resnet26"

    @property
    def is_resnet(self) -> bool:
        return is_resnet(self.model_name)

    @property
    def task(self) -> str:
        return model_task(self.model_name)

    @property
    def takes_keys(self) -> bool:
        """A ResNet or a detector over one: it takes the architecture keys, not ``model_args``."""
        return self.is_resnet or self.task == "detection"

    def resnet_keys_set(self) -> list[str]:
        return [k for k in RESNET_KEYS if getattr(self, k) is not None]

    def identity(self) -> dict:
        """What identifies this architecture in fingerprints: every key, but the detector's own while
        unset (a classifier never sets them; runs fingerprinted before detectors existed stay found)."""
        return self.model_dump(exclude={k for k in DETECTOR_KEYS if getattr(self, k) is None})

    @property
    def form_name(self) -> str:
        return self.form or "conv"

    @property
    def mixer_name(self) -> str:
        return self.mixer or "sasa"

    def merged_over(self, base: ArchConfig) -> ArchConfig:
        """This variant over ``models.common``; a non-ResNet variant takes only its own keys (common's
        are the ResNets')."""
        if self.model is not None and not ArchConfig(model=self.model).takes_keys:
            return self
        return base.model_copy(update=self.model_dump(exclude_none=True))

    def build(self, num_classes: int, in_chans: int, resolution: int | None = None, **data_stats):
        """The network for data of ``num_classes`` and ``in_chans``. A detector also takes the images'
        size (``resolution``: it resizes its inputs to it) and their ``image_mean``/``image_std``."""
        check_model(self.model_name)
        detector = self.task == "detection"
        if self.takes_keys:
            if self.model_args is not None:
                raise ValueError(
                    f"model_args is for models beyond the ResNets and their detectors; "
                    f"{self.model_name} takes its options as keys ({', '.join(RESNET_KEYS)})"
                )
            wrong = [k for k in DETECTOR_KEYS if getattr(self, k) is not None] if not detector else []
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: options of the detectors; {self.model_name} is a classifier")
            kwargs = self.model_dump(exclude_none=True, exclude={"model"})
            if detector:
                kwargs.update(data_stats, **({"image_size": resolution} if resolution else {}))
        else:
            if self.resnet_keys_set():
                raise ValueError(
                    f"{', '.join(self.resnet_keys_set())}: ResNet keys; "
                    f"{self.model_name} takes its options in model_args"
                )
            kwargs = dict(self.model_args or {})
        return sasa.create_model(self.model_name, num_classes=num_classes, in_chans=in_chans, **kwargs)


RESNET_KEYS = tuple(k for k in ArchConfig.model_fields if k not in ("model", "model_args"))
DETECTOR_KEYS = ("head_mixer", "fpn_channels", "anchor_sizes")


def models_for(task: str) -> str:
    """The models of ``task`` as an error message lists them."""
    timm = ["timm:NAME"] if task == "classification" else []
    return " | ".join([*list_models(task=task), *timm])


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
