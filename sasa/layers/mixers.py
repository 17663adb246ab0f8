"""Spatial mixers: what fills the 3x3 position of a ResNet bottleneck. One name per mixer."""
from __future__ import annotations

import torch.nn as nn

from sasa.layers._checks import check_choice
from sasa.layers.sasa2d import SASA2d


def conv_mixer(in_channels, out_channels, stride=1, **_):
    """The baseline 3x3 convolution (stride on the conv, as torchvision's ResNet v1.5)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


def sasa_mixer(in_channels, out_channels, stride=1, *, kernel_size=7, heads=8, pos_enc="relative", impl="fast", **_):
    return SASA2d(in_channels, out_channels, kernel_size, heads, stride, pos_enc, impl)


MIXERS = {"conv": conv_mixer, "sasa": sasa_mixer}


def create_mixer(name, in_channels, out_channels, stride=1, **kwargs):
    check_choice("mixer", name, tuple(MIXERS))
    return MIXERS[name](in_channels, out_channels, stride, **kwargs)
