"""Blocked local self-attention with a halo (HaloNet), a spatial mixer beside SASA."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_choice, check_positive_int
from sasa.layers._kernels import kernel
from sasa.layers.blocked import blocked_mixer_attention, halo_axis
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d, add_relative_embeddings, check_attention_layer
from sasa.ops.blocked_attention import BLOCKED_ATTENTION_IMPLS

POS_ENCODINGS = ("relative", "none")


@register_mixer(
    "halo",
    paper="HaloNet (Vaswani et al., 2021)",
    marker="P",
    bench_options=lambda k: {"block_size": 8, "halo": k // 2},  # HaloNet's b = 8, h = 3 at k = 7
    test_options={"block_size": 3, "halo": 1},
)
class HaloAttention2d(nn.Module):
    """Multi-head local self-attention over blocks with a halo (Vaswani et al., 2021, "Scaling
    Local Self-Attention for Parameter Efficient Visual Backbones").

    The queries of each non-overlapping b x b block share one (b+2h) x (b+2h) key/value window:
    the block plus a halo of h pixels. Sharing the window is why it is cheaper in memory traffic
    than SASA's per-pixel windows (one window per b^2 queries), at the price of a receptive field
    that depends on where a pixel sits in its block. The map is zero-padded to a multiple of b
    and by h at the borders; padded key positions are masked out of the softmax as in SASA2d,
    and outputs of padding pixels are cropped. ``pos_enc="relative"`` adds q.r with
    r = [row-offset, column-offset] embeddings indexed by the query's own offset to the key
    (2(b+h)-1 per axis), so with b=1 the layer is SASA2d with kernel_size 2h+1. Logits are unscaled,
    as SASA's (HaloNet scales q by 1/sqrt(d_head)). ``stride=2`` average-pools after the attention,
    as SASA2d does (HaloNet subsamples the queries instead). ``impl="reference"`` computes it
    as batched matrix products over (image, head, block) on unfolded windows; ``"fast"`` (default)
    runs the same function as ``sasa.layers.blocked`` halo blocks, never storing the logits.
    """

    counted_impl = "reference"  # the FLOP counter sees its matrix products

    def __init__(
        self, in_channels, out_channels, stride=1, *, block_size=8, halo=3, heads=8, pos_enc="relative", impl="fast"
    ):
        super().__init__()
        check_positive_int("block_size", block_size)
        if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
            raise ValueError(f"halo must be a non-negative integer, got {halo!r}")
        check_attention_layer(in_channels, out_channels, heads, stride, pos_enc, POS_ENCODINGS)
        check_choice("impl", impl, tuple(BLOCKED_ATTENTION_IMPLS))
        head_dim = out_channels // heads
        self.in_channels, self.out_channels = in_channels, out_channels
        self.block_size, self.halo, self.heads, self.head_dim = block_size, halo, heads, head_dim
        self.stride, self.pos_enc, self.impl = stride, pos_enc, impl
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, 1, bias=False)
        add_relative_embeddings(self, heads, head_dim, 2 * (block_size + halo) - 1, pos_enc == "relative")
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def forward(self, x):
        return self.pool(getattr(self, f"_{kernel(self)}")(x))

    def _fast(self, x):
        return blocked_mixer_attention(self, x, lambda n: halo_axis(n, self.block_size, self.halo, x.dtype, x.device))

    def _reference(self, x):
        B, _, H, W = x.shape
        b, h, heads, d = self.block_size, self.halo, self.heads, self.head_dim
        w = b + 2 * h
        nH, nW = -(-H // b), -(-W // b)
        pad_h, pad_w = nH * b - H, nW * b - W
        n = B * heads * nH * nW  # one row of the batched matrix products per (image, head, block)
        # (B, heads, nH*b + 2h, nW*b + 2h, d): zero-padded, each head's channels last
        qkv = F.pad(self.qkv(x), (h, h + pad_w, h, h + pad_h))
        q, k, v = qkv.view(B, 3, heads, d, nH * b + 2 * h, nW * b + 2 * h).permute(1, 0, 2, 4, 5, 3)
        q = (
            q[:, :, h : h + nH * b, h : h + nW * b]
            .reshape(B, heads, nH, b, nW, b, d)
            .transpose(3, 4)
            .reshape(n, b * b, d)
        )

        def windows(t):  # (n, d, w*w): each block's window (block + halo)
            return t.unfold(2, w, b).unfold(3, w, b).reshape(n, d, w * w)

        logits = torch.bmm(q, windows(k))  # (n, b*b queries, w*w keys)
        if self.rel_row is not None:
            # key row a of the window against query row i of the block: offset a - h - i,
            # embedding index offset + b + h - 1
            idx = torch.arange(w, device=x.device)[None, :] - torch.arange(b, device=x.device)[:, None] + b - 1
            half = d // 2
            qb = q.view(B, heads, nH * nW, b, b, d)
            row = torch.einsum("zhnijc,hcia->zhnija", qb[..., :half], self.rel_row[:, :, idx])
            col = torch.einsum("zhnijc,hcjx->zhnijx", qb[..., half:], self.rel_col[:, :, idx])
            logits = logits + (row[..., :, None] + col[..., None, :]).reshape(n, b * b, w * w)
        inside = F.pad(x.new_ones(H, W), (h, h + pad_w, h, h + pad_h)).unfold(0, w, b).unfold(1, w, b)
        inside = inside.reshape(1, nH * nW, 1, w * w) > 0
        attn = logits.view(B * heads, nH * nW, b * b, w * w).masked_fill(~inside, float("-inf")).softmax(-1)
        out = torch.bmm(windows(v), attn.view(n, b * b, w * w).transpose(1, 2))  # (n, d, b*b)
        out = out.view(B, heads, nH, nW, d, b, b).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, heads * d, nH * b, nW * b)
        return out[..., :H, :W]

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, block_size={self.block_size}, "
            f"halo={self.halo}, heads={self.heads}, pos_enc={self.pos_enc!r}, impl={self.impl!r}"
        )
