"""Building mixers by name: ``create_mixer("halo", 64, 64, stride, shared, block_size=8)``.

Every mixer is built as ``cls(in_channels, out_channels, stride, **options)``. The network's
shared attention settings (``kernel_size``, ``heads``, ``pos_enc``, ``impl``) reach the mixers
whose constructors take them; anything else is a mixer's own option (``mixer_args``), checked
strictly so that a misspelt option is an error rather than silently ignored. The names are the
registry's (``sasa.layers.registry``).
"""

from __future__ import annotations

import torch.nn as nn

from sasa.layers._checks import check_choice
from sasa.layers.registry import MIXER_INFO, MIXERS, register_mixer
from sasa.layers.sasa2d import SASA2d

__all__ = ["MIXERS", "MIXER_INFO", "Conv3x3", "SASAMixer", "create_mixer", "mixer_options"]


@register_mixer("conv", paper="ResNet (He et al., 2016)", marker="o")
class Conv3x3(nn.Conv2d):
    """The baseline 3x3 convolution (stride on the conv, as torchvision's ResNet v1.5)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, 3, stride, 1, bias=False)


@register_mixer("sasa", paper="SASA (Ramachandran et al., 2019)", marker="s")
class SASAMixer(SASA2d):
    """SASA with the mixer argument order (stride third)."""

    def __init__(self, in_channels, out_channels, stride=1, *, kernel_size=7, heads=8, pos_enc="relative", impl="fast"):
        super().__init__(in_channels, out_channels, kernel_size, heads, stride, pos_enc, impl)


def mixer_options(name) -> tuple[str, ...]:
    """The keyword options mixer ``name`` takes (besides channels and stride)."""
    check_choice("mixer", name, tuple(MIXERS))
    return MIXER_INFO[name].options


def create_mixer(name, in_channels, out_channels, stride=1, shared=None, **options):
    """Build mixer ``name``. ``shared`` holds the network-wide attention settings, passed on where
    the mixer takes them; ``options`` are the mixer's own and must all be known to it."""
    allowed = mixer_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"mixer={name!r} has no option {', '.join(map(repr, unknown))}; it takes: {', '.join(allowed) or 'none'}"
        )
    kwargs = {k: v for k, v in (shared or {}).items() if k in allowed}
    return MIXERS[name](in_channels, out_channels, stride, **{**kwargs, **options})
