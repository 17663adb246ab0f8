"""Checks of ``params.yaml`` that cost more than reading it: every variant and every architecture the
sweep can produce is built once (on the meta device: no weights are allocated) and tried at
``data.resolution``, so that a bad value anywhere fails before any data or training work, in the
first stage that runs. ``pipeline.config.validate`` runs them.
"""

from __future__ import annotations

import itertools

import torch

from pipeline.arch_config import ArchConfig, is_arch_key
from pipeline.config import Config, ConfigError


def _resolution_error(model, resolution: int) -> str | None:
    """Why ``model`` cannot take ``resolution`` px images, or None. The ResNets know their minimum;
    other models (fixed image sizes, windows that must divide the maps) are tried on one image."""
    if hasattr(model, "min_input_size"):
        if resolution < model.min_input_size:
            return (
                f"it needs at least {model.min_input_size} px (set models.common.small_input: true for 28-32 px images)"
            )
        return None
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, model.in_chans, resolution, resolution))
    except (AssertionError, RuntimeError, ValueError) as err:
        return (
            f"it fails on {resolution} px images ({str(err).strip() or type(err).__name__}); "
            "fit its size options in model_args (e.g. img_size)"
        )
    return None


def _built(arch: ArchConfig, resolution: int):
    """The network; a ResNet or a detector over one on the meta device, since it states its size rule
    (``min_input_size``). The other families are tried on a real image (a mixture of experts' routing has
    no meta kernel), and so is a network whose construction reads a value (``Tensor.item``)."""
    if arch.takes_keys:
        try:
            with torch.device("meta"):
                return arch.build(num_classes=10, in_chans=3, resolution=resolution)
        except (RuntimeError, NotImplementedError):  # no meta kernel: a real build says what is wrong, if anything
            pass
    with torch.device("cpu"):
        return arch.build(num_classes=10, in_chans=3, resolution=resolution)


def _check_variants(cfg: Config):
    """Build every variant once so architecture errors surface before any data or training work."""
    for name in cfg.models.variants:
        try:
            model = _built(cfg.models.resolved(name), cfg.data.resolution)
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
            model = _built(cfg.trial_arch(overrides), cfg.data.resolution)
        except (ValueError, TypeError) as err:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"sweep.space {overrides}: {err}") from None
        why = _resolution_error(model, cfg.data.resolution)
        if why:
            raise ConfigError(f"sweep.space {overrides}: data.resolution={cfg.data.resolution} does not fit: {why}")


BUILDS = {"variants": _check_variants, "sweep": _check_sweep}  # the names of pipeline.config.EVERYTHING


def run_builds(cfg: Config, builds: tuple[str, ...]):
    """Build what each of ``builds`` names."""
    for name in builds:
        BUILDS[name](cfg)
