"""The stand-alone self-attention layer (SASA), a drop-in for a k x k convolution."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_choice, check_divisible, check_odd_kernel, check_positive_int
from sasa.layers._kernels import kernel
from sasa.ops.local_attention import LOCAL_ATTENTION_IMPLS

POS_ENCODINGS = ("relative", "absolute", "none")


def sinusoidal_2d(dim, H, W, *, dtype=None, device=None):
    """Fixed (dim, H, W) absolute encoding: dim/2 sinusoid channels of the row, dim/2 of the column."""
    half = dim // 2
    freqs = torch.exp(torch.arange(0, half, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / half))

    def axis(n):  # (half, n)
        angles = freqs[:, None] * torch.arange(n, device=device, dtype=torch.float64)[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=0)[:half]

    pe = torch.cat([axis(H)[:, :, None].expand(half, H, W), axis(W)[:, None, :].expand(half, H, W)], dim=0)
    return pe.to(dtype)


class CeilAvgPool2d(nn.Module):
    """2x2/2 average pool in ceil mode, averaging over the in-image pixels of border windows:
    ``nn.AvgPool2d(2, 2, ceil_mode=True)`` computed as a zero-padded sum over the in-image count.
    Written out because torch.compile (inductor, torch 2.14) divides border windows by 4 in that
    module's backward pass, giving wrong gradients on odd-sized maps."""

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % 2 == 0 and W % 2 == 0:
            return F.avg_pool2d(x, 2, 2)
        pad = (0, W % 2, 0, H % 2)
        count = F.avg_pool2d(F.pad(x.new_ones(1, 1, H, W), pad), 2, 2)
        return F.avg_pool2d(F.pad(x, pad), 2, 2) / count


def check_attention_layer(in_channels, out_channels, heads, stride, pos_enc, pos_encodings):
    """The argument checks every multi-head attention mixer shares; position encodings split each
    head's channels into row and column halves."""
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    check_positive_int("heads", heads)
    check_choice("stride", stride, (1, 2))
    check_choice("pos_enc", pos_enc, pos_encodings)
    check_divisible("out_channels", out_channels, heads, f"split over heads={heads}")
    if pos_enc != "none":
        check_divisible(
            "out_channels",
            out_channels,
            2 * heads,
            f"each of the {heads} heads splits its position encoding into row and column halves",
        )


def add_relative_embeddings(module, heads, head_dim, n, enabled=True):
    """``module.rel_row`` / ``rel_col``: (heads, head_dim/2, n) row and column offset embeddings
    (or ``None`` parameters when disabled)."""
    if enabled:
        module.rel_row = nn.Parameter(torch.randn(heads, head_dim // 2, n) * head_dim**-0.5)
        module.rel_col = nn.Parameter(torch.randn(heads, head_dim // 2, n) * head_dim**-0.5)
    else:
        module.register_parameter("rel_row", None)
        module.register_parameter("rel_col", None)


class SASA2d(nn.Module):
    """Multi-head local self-attention over each pixel's k x k window (Ramachandran et al., 2019).

    Queries, keys and values are one dense 1x1 projection (the paper's text describes per-head
    matrices; dense is what reproduces Table 1's parameter counts), so parameters do not depend on
    ``kernel_size`` except through the relative embeddings (k vectors per axis, d_head/2 wide, per
    head). Logits are not scaled by 1/sqrt(d_head): the paper's formula has no scale.
    ``pos_enc``: ``relative`` adds q.r with r = [row-offset, column-offset] embeddings (the
    paper's); ``absolute`` adds a fixed 2-D sinusoidal encoding of the pixel position to the keys
    (no parameters, not translation-equivariant); ``none`` uses q.k only. Out-of-image window
    positions are masked. With ``stride=2`` a 2x2/2 average pool follows the attention (ceil
    mode, so output sizes match a padded 3x3/2 convolution). ``impl`` picks the kernel:
    ``fast`` (default) or ``reference``; both compute the same function.
    """

    counted_impl = "fast"  # its op has a FLOP formula; the reference's elementwise products are not counted

    def __init__(self, in_channels, out_channels, kernel_size=7, heads=8, stride=1, pos_enc="relative", impl="fast"):
        super().__init__()
        check_odd_kernel("kernel_size", kernel_size)
        check_choice("impl", impl, tuple(LOCAL_ATTENTION_IMPLS))
        check_attention_layer(in_channels, out_channels, heads, stride, pos_enc, POS_ENCODINGS)
        head_dim = out_channels // heads
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.heads, self.head_dim = kernel_size, heads, head_dim
        self.stride, self.pos_enc, self.impl = stride, pos_enc, impl
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, 1, bias=False)
        add_relative_embeddings(self, heads, head_dim, kernel_size, pos_enc == "relative")
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def forward(self, x):
        B, _, H, W = x.shape
        q, k, v = self.qkv(x).view(B, 3, self.heads, self.head_dim, H, W).unbind(1)
        if self.pos_enc == "absolute":
            k = k + sinusoidal_2d(self.head_dim, H, W, dtype=k.dtype, device=k.device)
        out = LOCAL_ATTENTION_IMPLS[kernel(self)](q, k, v, self.kernel_size, self.rel_row, self.rel_col)
        return self.pool(out.reshape(B, self.out_channels, H, W))

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, heads={self.heads}, "
            f"stride={self.stride}, pos_enc={self.pos_enc!r}, impl={self.impl!r}"
        )
