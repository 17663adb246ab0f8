"""Blocked local self-attention with a halo (HaloNet), a spatial mixer beside SASA."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_positive_int
from sasa.layers.sasa2d import CeilAvgPool2d, add_relative_embeddings, check_attention_layer

POS_ENCODINGS = ("relative", "none")


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
    (2(b+h)-1 per axis), so with b=1 the layer is SASA2d with kernel_size 2h+1.
    ``stride=2`` average-pools after the attention, as SASA2d does.
    """

    def __init__(self, in_channels, out_channels, stride=1, *, block_size=8, halo=3, heads=8, pos_enc="relative"):
        super().__init__()
        check_positive_int("block_size", block_size)
        if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
            raise ValueError(f"halo must be a non-negative integer, got {halo!r}")
        check_attention_layer(in_channels, out_channels, heads, stride, pos_enc, POS_ENCODINGS)
        head_dim = out_channels // heads
        self.in_channels, self.out_channels = in_channels, out_channels
        self.block_size, self.halo, self.heads, self.head_dim = block_size, halo, heads, head_dim
        self.stride, self.pos_enc = stride, pos_enc
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, 1, bias=False)
        add_relative_embeddings(self, heads, head_dim, 2 * (block_size + halo) - 1, pos_enc == "relative")
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def forward(self, x):
        B, _, H, W = x.shape
        b, h, heads, d = self.block_size, self.halo, self.heads, self.head_dim
        w = b + 2 * h
        nH, nW = -(-H // b), -(-W // b)
        pad_h, pad_w = nH * b - H, nW * b - W
        q, k, v = self.qkv(x).view(B, 3, heads, d, H, W).unbind(1)

        # (B, heads, d, nH, nW, b, b): the queries of each block
        q = F.pad(q, (0, pad_w, 0, pad_h)).view(B, heads, d, nH, b, nW, b).transpose(4, 5)

        def windows(t):  # (B, heads, d, nH, nW, w*w): each block's window, zeros outside the image
            t = F.pad(t, (h, h + pad_w, h, h + pad_h))
            return t.unfold(3, w, b).unfold(4, w, b).reshape(B, heads, d, nH, nW, w * w)

        inside = F.pad(x.new_ones(H, W), (h, h + pad_w, h, h + pad_h)).unfold(0, w, b).unfold(1, w, b)
        inside = inside.reshape(nH, nW, 1, w * w) > 0
        logits = torch.einsum("zhdnmq,zhdnmk->zhnmqk", q.reshape(B, heads, d, nH, nW, b * b), windows(k))
        if self.rel_row is not None:
            # key row a of the window against query row i of the block: offset a - h - i,
            # embedding index offset + b + h - 1
            idx = torch.arange(w, device=x.device)[None, :] - torch.arange(b, device=x.device)[:, None] + b - 1
            half = d // 2
            row = torch.einsum("zhcnmij,hcia->zhnmija", q[:, :, :half], self.rel_row[:, :, idx])
            col = torch.einsum("zhcnmij,hcjx->zhnmijx", q[:, :, half:], self.rel_col[:, :, idx])
            logits = logits + (row[..., :, None] + col[..., None, :]).reshape(B, heads, nH, nW, b * b, w * w)
        attn = logits.masked_fill(~inside, float("-inf")).softmax(dim=-1)
        out = torch.einsum("zhnmqk,zhdnmk->zhdnmq", attn, windows(v))
        out = out.view(B, heads, d, nH, nW, b, b).transpose(4, 5).reshape(B, self.out_channels, nH * b, nW * b)
        return self.pool(out[..., :H, :W])

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, block_size={self.block_size}, "
            f"halo={self.halo}, heads={self.heads}, pos_enc={self.pos_enc!r}"
        )
