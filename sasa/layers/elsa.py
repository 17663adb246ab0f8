"""ELSA, enhanced local self-attention (Zhou et al., 2021), as a bottleneck mixer.

Two changes to local self-attention, as the authors' code makes them:

- **Hadamard attention**: the logits of a pixel's k x k window come from q * k at that pixel alone
  (an elementwise product, scaled), through a grouped k x k convolution (groups of 8 channels), GELU
  and a 1x1 convolution to k^2 logits per head; a softmax over the k^2 gives each pixel and head
  its window weights a[h, o] (a dynamic filter, not q . k_j for every neighbour j);
- **ghost head**: every channel c of head h gets its own filter from the head's weights,
  m[c, o]^lambda * a[h, o] + gamma * g[c, o], with learned m and g per channel and offset.

The output at pixel i is sum over offsets o of v[c, i + o] times channel c's filter (zeros beyond
the border), then a 1x1 projection. q and k have 2/3 of the channels (rounded up to groups of 8).
A stride of 2 pools after mixing, as the other mixers here do (ELSA pools the Hadamard product).

``impl="reference"`` builds every channel's filter and unfolds the windows (two k^2-times copies);
``impl="fast"`` passes the heads' weights, m^lambda and gamma g to SAN's footprint aggregation, whose
C++ kernel forms each channel's filter as it reads shifted rows of the values (no copies).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_choice, check_divisible, check_odd_kernel, check_positive_int
from sasa.layers._kernels import kernel
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d
from sasa.ops.footprint_aggregate import footprint_aggregate


@register_mixer("elsa", paper="ELSA (Zhou et al., 2021)", marker="$E$")
class ELSA2d(nn.Module):
    counted_impl = "reference"

    def __init__(
        self,
        in_channels,
        out_channels,
        stride=1,
        *,
        kernel_size=7,
        heads=4,
        group_width=8,
        lam=1.0,
        gamma=1.0,
        impl="fast",
    ):
        super().__init__()
        check_choice("impl", impl, ("fast", "reference"))
        self.impl = impl
        check_odd_kernel("kernel_size", kernel_size)
        check_positive_int("heads", heads)
        check_positive_int("group_width", group_width)
        check_choice("stride", stride, (1, 2))
        check_divisible("out_channels", out_channels, heads, f"split over heads={heads}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.kernel_size, self.heads, self.lam, self.gamma = kernel_size, heads, lam, gamma
        self.qk_channels = math.ceil(out_channels * 2 / 3 / group_width) * group_width
        self.qkv = nn.Conv2d(in_channels, 2 * self.qk_channels + out_channels, 1, bias=False)
        self.logits = nn.Sequential(
            nn.Conv2d(
                self.qk_channels,
                self.qk_channels,
                kernel_size,
                padding=kernel_size // 2,
                groups=self.qk_channels // group_width,
            ),
            nn.GELU(),
            nn.Conv2d(self.qk_channels, kernel_size**2 * heads, 1),
        )
        self.ghost_mul = nn.Parameter(torch.randn(out_channels, kernel_size**2))
        self.ghost_add = nn.Parameter(torch.randn(out_channels, kernel_size**2) * 0.02)
        self.proj = nn.Conv2d(out_channels, out_channels, 1)
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def head_weights(self, x):
        """(B, heads, k^2, H, W): each head's softmax weights over its pixel's window; and the values."""
        B, _, H, W = x.shape
        q, k, v = self.qkv(x).split([self.qk_channels, self.qk_channels, self.out_channels], 1)
        weights = self.logits(q * k * (self.out_channels // self.heads) ** -0.5)  # Hadamard: one pixel's q and k
        return weights.view(B, self.heads, self.kernel_size**2, H, W).softmax(2), v

    def ghost_scale(self):
        """m^lambda, or None (all ones) when lambda = 0."""
        return self.ghost_mul.pow(self.lam) if self.lam != 0 else None

    def filters(self, x):
        """(B, C, k^2, HW): each channel's filter over its pixel's window; and the values."""
        weights, v = self.head_weights(x)
        weights = weights.flatten(3).repeat_interleave(
            self.out_channels // self.heads, dim=1
        )  # the head's weights, per channel
        scale = self.ghost_scale()
        if scale is not None:
            weights = scale[None, :, :, None] * weights
        return weights + self.gamma * self.ghost_add[None, :, :, None], v

    def forward(self, x):
        B, _, H, W = x.shape
        k = self.kernel_size
        if kernel(self) == "reference":
            filters, v = self.filters(x)
            windows = F.unfold(v, k, padding=k // 2).view(B, self.out_channels, k**2, H * W)
            out = torch.einsum("bcop,bcop->bcp", filters, windows).view(B, self.out_channels, H, W)
        else:
            weights, v = self.head_weights(x)
            out = footprint_aggregate(
                weights, v, k, self.ghost_scale(), self.gamma * self.ghost_add if self.gamma != 0 else None
            )
        return self.pool(self.proj(out))

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, kernel_size={self.kernel_size}, "
            f"heads={self.heads}, impl={self.impl!r}"
        )
