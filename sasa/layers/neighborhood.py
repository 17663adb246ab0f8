"""Neighborhood attention: SASA with windows shifted, not padded, at the borders."""

from __future__ import annotations

import torch
import torch.nn as nn

from sasa.layers._checks import check_choice, check_odd_kernel
from sasa.layers._kernels import kernel
from sasa.layers.blocked import blocked_mixer_attention, neighborhood_axis
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d, add_relative_embeddings, check_attention_layer
from sasa.ops.blocked_attention import BLOCKED_ATTENTION_IMPLS

POS_ENCODINGS = ("relative", "none")


def window_positions(n, kernel_size, device=None):
    """(n, k): the rows (columns) of each pixel's window on an axis of length n, centred on the
    pixel and shifted inward at the borders so the window stays in [0, n)."""
    start = (torch.arange(n, device=device) - kernel_size // 2).clamp(0, n - kernel_size)
    return start[:, None] + torch.arange(kernel_size, device=device)


@register_mixer("neighborhood", paper="Neighborhood Attention (Hassani et al., 2023)", marker="v")
class NeighborhoodAttention2d(nn.Module):
    """Multi-head local self-attention over each pixel's k x k nearest neighbours (Hassani et
    al., 2023, "Neighborhood Attention Transformer").

    Like SASA2d in the interior, but at the borders the window is shifted to stay inside the
    image instead of being padded and masked, so every pixel attends over exactly k^2 real keys
    (the attention span does not shrink at the borders). Because of the shift a key can be up to
    k-1 rows (columns) away, so ``pos_enc="relative"`` uses 2k-1 row and column embeddings per
    head, indexed by key - query + k - 1: a q.r term, as SASA's, where NAT adds a learned scalar per
    head and offset instead; ``bias=True`` adds NAT's (2k-1)^2 scalars per head (with
    ``pos_enc="none"``, NAT's logits: q.k + b[offset]). Logits are not scaled by 1/sqrt(d), as in
    SASA (NAT scales them). Needs maps at least k x k. ``stride=2`` average-pools
    after the attention, as SASA2d does. ``impl="reference"`` gathers every pixel's k^2 keys;
    ``"fast"`` (default) computes the same function over blocks of queries
    (``sasa.layers.blocked``), never storing the logits (with ``bias``, in PyTorch's fused attention
    on gathered blocks: the C++ kernel takes only biases that factorise over rows and columns).
    """

    counted_impl = "reference"  # the FLOP counter sees its einsums: k^2 keys per pixel, not the blocks'
    query_block = 4  # fast path: 4 x 4 queries share (4 + k - 1)^2 keys; larger blocks waste more logits

    def __init__(
        self,
        in_channels,
        out_channels,
        stride=1,
        *,
        kernel_size=7,
        heads=8,
        pos_enc="relative",
        bias=False,
        impl="fast",
    ):
        super().__init__()
        check_odd_kernel("kernel_size", kernel_size)
        check_attention_layer(in_channels, out_channels, heads, stride, pos_enc, POS_ENCODINGS)
        check_choice("impl", impl, tuple(BLOCKED_ATTENTION_IMPLS))
        check_choice("bias", bias, (False, True))
        head_dim = out_channels // heads
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.heads, self.head_dim = kernel_size, heads, head_dim
        self.min_size = kernel_size  # windows shift inside the map, so it must hold one (ResNet reads this)
        self.stride, self.pos_enc, self.impl = stride, pos_enc, impl
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, 1, bias=False)
        add_relative_embeddings(self, heads, head_dim, 2 * kernel_size - 1, pos_enc == "relative")
        extent = 2 * kernel_size - 1
        self.rel_bias = (
            nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, extent, extent), std=0.02)) if bias else None
        )
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def neighbour_index(self, H, W, device=None):
        """(H, W, k*k) flat indices (row * W + column) of every pixel's keys, row-major in the window."""
        k = self.kernel_size
        rows, cols = window_positions(H, k, device), window_positions(W, k, device)
        return (rows[:, None, :, None] * W + cols[None, :, None, :]).reshape(H, W, k * k)

    def forward(self, x):
        H, W = x.shape[-2:]
        k = self.kernel_size
        if H < k or W < k:
            raise ValueError(f"kernel_size={k} needs a feature map at least {k} x {k}, got {H} x {W}")
        return self.pool(getattr(self, f"_{kernel(self)}")(x))

    def _fast(self, x):
        return blocked_mixer_attention(
            self, x, lambda n: neighborhood_axis(n, self.kernel_size, self.query_block, x.dtype, x.device)
        )

    def _reference(self, x):
        B, _, H, W = x.shape
        k, heads, d = self.kernel_size, self.heads, self.head_dim
        q, key, v = self.qkv(x).view(B, 3, heads, d, H, W).unbind(1)
        idx = self.neighbour_index(H, W, x.device).flatten()

        def neighbours(t):  # (B, heads, d, H, W, k*k)
            return t.reshape(B, heads, d, H * W).index_select(-1, idx).view(B, heads, d, H, W, k * k)

        logits = torch.einsum("zhdyx,zhdyxn->zhyxn", q, neighbours(key))
        # relative index key - query + k - 1 of each pixel's window, (H, k) and (W, k)
        row_idx = window_positions(H, k, x.device) - torch.arange(H, device=x.device)[:, None] + k - 1
        col_idx = window_positions(W, k, x.device) - torch.arange(W, device=x.device)[:, None] + k - 1
        if self.rel_row is not None:
            half = d // 2
            row = torch.einsum("zhcyx,hcya->zhyxa", q[:, :, :half], self.rel_row[:, :, row_idx])
            col = torch.einsum("zhcyx,hcxb->zhyxb", q[:, :, half:], self.rel_col[:, :, col_idx])
            logits = logits + (row[..., :, None] + col[..., None, :]).reshape(B, heads, H, W, k * k)
        if self.rel_bias is not None:
            offsets = self.rel_bias[:, row_idx[:, None, :, None], col_idx[None, :, None, :]]  # (heads, H, W, k, k)
            logits = logits + offsets.flatten(3)
        attn = logits.softmax(dim=-1)
        out = torch.einsum("zhyxn,zhdyxn->zhdyx", attn, neighbours(v))
        return out.reshape(B, self.out_channels, H, W)

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, kernel_size={self.kernel_size}, "
            f"heads={self.heads}, pos_enc={self.pos_enc!r}, bias={self.rel_bias is not None}, impl={self.impl!r}"
        )
