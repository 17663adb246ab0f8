"""Spatial mixers: what fills the 3x3 position of a ResNet bottleneck. One name per mixer.

Every mixer is built as ``cls(in_channels, out_channels, stride, **options)``. The network's
shared attention settings (``kernel_size``, ``heads``, ``pos_enc``, ``impl``) reach the mixers
whose constructors take them; anything else is a mixer's own option (``mixer_args``), checked
strictly so that a misspelt option is an error rather than silently ignored.
"""
from __future__ import annotations

import inspect

import torch.nn as nn

from sasa.layers._checks import check_choice
from sasa.layers.acmix import ACmix2d
from sasa.layers.global_attention import AttentionAugmentedConv2d, BoTAttention2d
from sasa.layers.gnconv import GnConv2d
from sasa.layers.halo import HaloAttention2d
from sasa.layers.elsa import ELSA2d
from sasa.layers.lesa import LESA2d
from sasa.layers.neighborhood import NeighborhoodAttention2d
from sasa.layers.qna import QnA2d
from sasa.layers.quadratic import QuadraticAttention2d
from sasa.layers.san import SANPairwise2d, SANPatchwise2d
from sasa.layers.sasa2d import SASA2d


class Conv3x3(nn.Conv2d):
    """The baseline 3x3 convolution (stride on the conv, as torchvision's ResNet v1.5)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, 3, stride, 1, bias=False)


class SASAMixer(SASA2d):
    """SASA with the mixer argument order (stride third)."""

    def __init__(self, in_channels, out_channels, stride=1, *, kernel_size=7, heads=8, pos_enc="relative", impl="fast"):
        super().__init__(in_channels, out_channels, kernel_size, heads, stride, pos_enc, impl)


MIXERS = {
    "conv": Conv3x3,
    "sasa": SASAMixer,
    "halo": HaloAttention2d,
    "neighborhood": NeighborhoodAttention2d,
    "bot": BoTAttention2d,
    "aa": AttentionAugmentedConv2d,
    "san_pairwise": SANPairwise2d,
    "san_patchwise": SANPatchwise2d,
    "gnconv": GnConv2d,
    "quadratic": QuadraticAttention2d,
    "acmix": ACmix2d,
    "qna": QnA2d,
    "lesa": LESA2d,
    "elsa": ELSA2d,
}
SHARED_OPTIONS = ("kernel_size", "heads", "pos_enc", "impl")


def mixer_options(name) -> tuple[str, ...]:
    """The keyword options mixer ``name`` takes (besides channels and stride)."""
    check_choice("mixer", name, tuple(MIXERS))
    params = inspect.signature(MIXERS[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def create_mixer(name, in_channels, out_channels, stride=1, shared=None, **options):
    """Build mixer ``name``. ``shared`` holds the network-wide attention settings, passed on where
    the mixer takes them; ``options`` are the mixer's own and must all be known to it."""
    allowed = mixer_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"mixer={name!r} has no option {', '.join(map(repr, unknown))}; it takes: {', '.join(allowed) or 'none'}")
    kwargs = {k: v for k, v in (shared or {}).items() if k in allowed}
    return MIXERS[name](in_channels, out_channels, stride, **{**kwargs, **options})
