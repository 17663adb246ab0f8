"""ACmix (Pan et al., 2022) as a bottleneck mixer: convolution and self-attention share their 1x1
projections.

Three 1x1 projections give q, k and v (``heads`` heads of d channels). The attention path is local
self-attention over each pixel's k x k window with the paper's positional term, q_i . (k_j + p_i -
p_j), p a learned 1x1 map of the pixels' coordinates in [-1, 1]. The convolution path reads the same
3 x heads maps of every channel d: a 1x1 map to c^2 maps (``conv_kernel`` c), then a grouped c x c
convolution that starts as the c^2 shifts (map s moved by offset s), so the sum is a c x c
convolution written as shift-and-sum. The output is rate_att * attention + rate_conv * convolution,
both rates learned and starting at 1/2.

Two choices differ from the authors' code: keys beyond the border are masked, as SASA's are (ACmix
pads by reflection), and a stride of 2 pools after mixing, as the other mixers here do (ACmix
strides its queries and its shift convolution).

The positional term is linear in the offset: p_i - p_j = -W_p (c_j - c_i), a row term plus a column
term, so the fast path (``impl="fast"``) is the blocked-attention op over blocks of 4 x 4 queries and
the union of their windows, each query masked to its own window (``sasa.layers.blocked``); the
reference unfolds the windows, and the FLOP counter counts through it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_choice, check_divisible, check_odd_kernel, check_positive_int
from sasa.layers._kernels import kernel
from sasa.layers.blocked import index_tables, query_blocks, window_axis
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d
from sasa.ops.blocked_attention import BLOCKED_ATTENTION_IMPLS


def coordinates(H, W, device=None, dtype=None):
    """(1, 2, H, W): each pixel's (row, column) scaled to [-1, 1] (0 on an axis of one pixel)."""

    def axis(n):
        return (
            torch.linspace(-1, 1, n, device=device, dtype=dtype)
            if n > 1
            else torch.zeros(1, device=device, dtype=dtype)
        )

    y, x = torch.meshgrid(axis(H), axis(W), indexing="ij")
    return torch.stack([y, x])[None]


@register_mixer("acmix", paper="ACmix (Pan et al., 2022)", marker="$A$")
class ACmix2d(nn.Module):
    counted_impl = "reference"
    query_block = 4

    def __init__(self, in_channels, out_channels, stride=1, *, kernel_size=7, heads=4, conv_kernel=3, impl="fast"):
        super().__init__()
        check_choice("impl", impl, tuple(BLOCKED_ATTENTION_IMPLS))
        self.impl = impl
        check_odd_kernel("kernel_size", kernel_size)
        check_odd_kernel("conv_kernel", conv_kernel)
        check_positive_int("heads", heads)
        check_divisible("out_channels", out_channels, heads, f"split over heads={heads}")
        check_choice("stride", stride, (1, 2))
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.kernel_size, self.heads, self.conv_kernel = kernel_size, heads, conv_kernel
        self.head_dim = out_channels // heads
        self.q, self.k, self.v = (nn.Conv2d(in_channels, out_channels, 1) for _ in range(3))
        self.pos = nn.Conv2d(2, self.head_dim, 1, bias=False)  # a bias would cancel in p_i - p_j (ACmix has one)
        self.fc = nn.Conv2d(3 * heads, conv_kernel**2, 1, bias=False)
        self.shift = nn.Conv2d(
            conv_kernel**2 * self.head_dim, out_channels, conv_kernel, padding=conv_kernel // 2, groups=self.head_dim
        )
        self.rate_att = nn.Parameter(torch.tensor(0.5))
        self.rate_conv = nn.Parameter(torch.tensor(0.5))
        with torch.no_grad():  # each of the c^2 maps starts as one shift: the kernel's tap s
            taps = torch.eye(conv_kernel**2).view(conv_kernel**2, conv_kernel, conv_kernel)
            self.shift.weight.copy_(taps[None].expand(out_channels, -1, -1, -1))
            self.shift.bias.zero_()
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        attention = self.attention if kernel(self) == "reference" else self.blocked_attention
        out = self.rate_att * attention(q, k, v) + self.rate_conv * self.convolution(q, k, v)
        return self.pool(out)

    def blocked_attention(self, q, k, v):
        """``attention`` through the blocked op: logit = q . k + row bias + column bias."""
        B, C, H, W = q.shape
        n, d = self.heads, self.head_dim
        rows, cols = (window_axis(m, self.kernel_size, self.query_block, q.dtype, q.device) for m in (H, W))
        q = (q * d**-0.5).view(B, n, d, H, W)
        w = self.pos.weight[:, :, 0, 0]  # (d, 2): p_j - p_i = w (c_j - c_i), c = -1 + 2 position / (size - 1)
        # q_i . w per axis, on the map first (the product saves q itself), then cut into query blocks
        u_row, u_col = (
            query_blocks(torch.einsum("zndhw,d->znhw", q, w[:, a])[:, :, None], rows, cols)[:, :, :, :, 0, ..., None]
            for a in (0, 1)
        )  # (B, n, R, C, bh, bw, 1)

        def offsets(axis, m):
            """(blocks, block, S): key - query positions along one axis, in coordinate units."""
            positions = torch.arange(axis.blocks * axis.block, device=q.device).view(axis.blocks, axis.block, 1)
            return (axis.keys[:, None, :] - positions).to(q.dtype) * (2 / (m - 1) if m > 1 else 0.0)

        row_bias = -u_row * offsets(rows, H)[None, None, :, None, :, None, :] + rows.mask[:, None, :, None, :]
        col_bias = -u_col * offsets(cols, W)[None, None, None, :, None, :, :] + cols.mask[None, :, None, :, :]
        queries, keys = index_tables(rows, cols, H, W)
        L = rows.block * cols.block
        out = BLOCKED_ATTENTION_IMPLS[self.impl](
            q.flatten(3),
            k.view(B, n, d, H * W),
            v.view(B, n, d, H * W),
            queries,
            keys,
            row_bias.reshape(-1, L, row_bias.shape[-1]),
            col_bias.reshape(-1, L, col_bias.shape[-1]),
        )
        return out.reshape(B, C, H, W)

    def attention(self, q, k, v):
        """Local attention over k x k windows, borders masked, with the coordinate term (the reference)."""
        B, C, H, W = q.shape
        n, d, kk = self.heads, self.head_dim, self.kernel_size
        p = self.pos(coordinates(H, W, q.device, q.dtype))  # (1, d, H, W)
        unfold = lambda t: F.unfold(t, kk, padding=kk // 2).view(t.shape[0], -1, kk * kk, H * W)  # noqa: E731
        seen = unfold(torch.ones(1, 1, H, W, device=q.device, dtype=q.dtype))[0, 0] > 0  # (k^2, HW)
        qh = q.view(B, n, d, H * W) * d**-0.5
        keys = unfold(k).view(B, n, d, kk * kk, H * W) - unfold(p)[:, None]  # k_j - p_j
        logits = (
            torch.einsum("bndq,bndsq->bnsq", qh, keys) + torch.einsum("bndq,dq->bnq", qh, p.view(d, H * W))[:, :, None]
        )
        weights = logits.masked_fill(~seen, float("-inf")).softmax(2)
        out = torch.einsum("bnsq,bndsq->bndq", weights, unfold(v).view(B, n, d, kk * kk, H * W))
        return out.reshape(B, C, H, W)

    def convolution(self, q, k, v):
        """The c^2 maps from the 3 x heads projections of each channel, then shift-and-sum."""
        B, C, H, W = q.shape
        n, d = self.heads, self.head_dim
        # fc over the 3n maps [q; k; v] of each channel, as three products: no concatenated copy to keep
        # (a 1x1 convolution over the heads axis of each (B, n, d, HW) view saves that view, not a copy)
        weights = self.fc.weight.unflatten(1, (3, n)).unbind(1)  # 3 x (c^2, n, 1, 1)
        maps = sum(F.conv2d(t.view(B, n, d, H * W), w) for w, t in zip(weights, (q, k, v)))  # (B, c^2, d, HW)
        return self.shift(
            maps.transpose(1, 2).reshape(B, d * self.conv_kernel**2, H, W)
        )  # channel d's c^2 maps together

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, kernel_size={self.kernel_size}, "
            f"heads={self.heads}, conv_kernel={self.conv_kernel}, impl={self.impl!r}"
        )
