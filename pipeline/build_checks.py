"""Checks of ``params.yaml`` that cost more than reading it: every variant or every architecture the
sweep can produce is built once (and tried at ``data.resolution``), and the strategies are looked up
in Lightning, so that bad values fail before any data or training work. ``pipeline.config.validate``
runs the ones a stage asks for.
"""

from __future__ import annotations

import itertools

from pipeline.arch_config import is_arch_key
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
    import torch

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


def _check_strategies(cfg: Config):
    """``train.strategy`` (and a sweep's) is one Lightning knows and this pipeline can run: the train
    stage agrees on resume across ranks before fit, so its processes must exist before fit (re-run
    by Lightning's launcher, as ddp does, or started by torchrun / srun), not spawned by fit."""
    from lightning.pytorch.strategies import StrategyRegistry

    spawned = ("spawn", "fork", "notebook")
    allowed = ["auto", *(s for s in StrategyRegistry.available_strategies() if not s.endswith(spawned))]
    for key, train in (("train", cfg.train), ("sweep.train", cfg.trial_train())):
        if train.strategy not in allowed:
            raise ConfigError(
                f"{key}.strategy={train.strategy!r}: unknown or unsupported strategy; allowed: {', '.join(allowed)}"
            )


def _check_variants(cfg: Config):
    """Build every variant once so architecture errors surface before any data or training work."""
    for name in cfg.models.variants:
        arch = cfg.models.resolved(name)
        try:
            model = arch.build(num_classes=10, in_chans=3, resolution=cfg.data.resolution)
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
            model = cfg.trial_arch(overrides).build(num_classes=10, in_chans=3, resolution=cfg.data.resolution)
        except (ValueError, TypeError) as err:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"sweep.space {overrides}: {err}") from None
        why = _resolution_error(model, cfg.data.resolution)
        if why:
            raise ConfigError(f"sweep.space {overrides}: data.resolution={cfg.data.resolution} does not fit: {why}")


BUILDS = {"variants": _check_variants, "sweep": _check_sweep}  # the names of pipeline.config.EVERYTHING


def run_builds(cfg: Config, builds: tuple[str, ...]):
    """Check the strategies, then build what each of ``builds`` names; any builds at all mean a stage
    that trains, which needs a strategy it can run."""
    if builds:
        _check_strategies(cfg)
    for name in builds:
        BUILDS[name](cfg)
