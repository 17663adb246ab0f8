"""Recursive gated convolution, g^n Conv (HorNet, Rao et al., 2022), as a bottleneck mixer.

A 1x1 projection splits into a gate p_0 (C / 2^(n-1) channels) and the inputs of n depthwise k x k
convolutions q_0..q_{n-1} (widths C / 2^(n-1), ..., C / 2, C); then p_{i+1} = g_i(p_i) * q_i, with g_i
a 1x1 projection to the next width, and a 1x1 projection of p_n is the output. Each product is one
more order of interaction between a pixel and its k x k neighbourhood: without biases the mixer is
a homogeneous polynomial of degree n + 1 in its input, which is what the tests check. As in the
authors' code the depthwise outputs are scaled by 1/3; a stride of 2 pools after mixing, as the
other mixers here do.
"""

from __future__ import annotations

import torch.nn as nn

from sasa.layers._checks import check_choice, check_divisible, check_odd_kernel, check_positive_int
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d


@register_mixer("gnconv", paper="g^n Conv, HorNet (Rao et al., 2022)", marker="$g$")
class GnConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1, *, kernel_size=7, order=3, scale=1 / 3):
        super().__init__()
        check_odd_kernel("kernel_size", kernel_size)
        check_positive_int("order", order)
        check_divisible(
            "out_channels", out_channels, 2 ** (order - 1), f"order={order} halves the width {order - 1} times"
        )
        check_choice("stride", stride, (1, 2))
        self.in_channels, self.out_channels, self.stride, self.order, self.scale = (
            in_channels,
            out_channels,
            stride,
            order,
            scale,
        )
        self.dims = [out_channels // 2 ** (order - 1 - i) for i in range(order)]
        self.proj_in = nn.Conv2d(in_channels, self.dims[0] + sum(self.dims), 1)
        self.dwconv = nn.Conv2d(
            sum(self.dims), sum(self.dims), kernel_size, padding=kernel_size // 2, groups=sum(self.dims)
        )
        self.pws = nn.ModuleList(nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1))
        self.proj_out = nn.Conv2d(out_channels, out_channels, 1)
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def forward(self, x):
        gate, rest = self.proj_in(x).split([self.dims[0], sum(self.dims)], dim=1)
        qs = (self.dwconv(rest) * self.scale).split(self.dims, dim=1)
        p = gate * qs[0]
        for g, q in zip(self.pws, qs[1:]):
            p = g(p) * q
        return self.pool(self.proj_out(p))

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, order={self.order}, dims={self.dims}"
