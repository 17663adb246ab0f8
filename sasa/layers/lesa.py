"""LESA, locally enhanced self-attention (Yang et al., 2021), as a bottleneck mixer.

The paper reads self-attention as a unary term (a pixel's own contribution) plus a binary term (the
others'), and finds the unary term contributes little. LESA computes the unary term by a grouped
3x3 convolution (groups = heads, then a 1x1 convolution to mix the groups, batch norm) and the binary
term by global multi-head self-attention (batch norm after it), and fuses them with a dynamic gate:
output = unary + sigmoid(g([unary; binary])) * binary, where g is ReLU, 1x1 conv (2C -> C), batch
norm, ReLU, 1x1 conv (C -> C), batch norm, as the authors' classification configuration sets it.
A stride of 2 pools after the fusion, as LESA does.

One choice differs from the authors' code: the binary term is BoTNet's attention here (``bot``: 2-D
relative logits q . r and its fast path), where LESA's code adds query, key and value embeddings of
the offset along the flattened pixel sequence.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sasa.layers._checks import check_choice, check_divisible, check_positive_int
from sasa.layers.global_attention import BoTAttention2d
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d


@register_mixer("lesa", paper="LESA (Yang et al., 2021)", marker="$L$", test_options={"max_extent": 4})
class LESA2d(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1, *, heads=8, max_extent=16, pos_enc="relative", impl="fast"):
        super().__init__()
        check_positive_int("heads", heads)
        check_choice("stride", stride, (1, 2))
        check_divisible("in_channels", in_channels, heads, f"the unary convolution has heads={heads} groups")
        self.in_channels, self.out_channels, self.stride, self.heads = in_channels, out_channels, stride, heads
        unary = [nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=heads, bias=False)]
        if heads > 1:
            unary.append(nn.Conv2d(out_channels, out_channels, 1, bias=False))
        self.unary = nn.Sequential(*unary, nn.BatchNorm2d(out_channels))
        self.binary = nn.Sequential(
            BoTAttention2d(
                in_channels, out_channels, 1, heads=heads, max_extent=max_extent, pos_enc=pos_enc, impl=impl
            ),
            nn.BatchNorm2d(out_channels),
        )
        self.gate = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(2 * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def forward(self, x):
        unary, binary = self.unary(x), self.binary(x)
        gate = torch.sigmoid(self.gate(torch.cat([unary, binary], 1)))
        return self.pool(unary + gate * binary)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, heads={self.heads}"
