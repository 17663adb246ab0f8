"""The attention core of a global mixer in PyTorch's own fused kernel: a floor for bot and aa.

The input map is read as q = k = v of ``heads`` heads over all pixels; no projections and no
relative logits, so any global mixer does at least this work (and its q . r terms besides).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SDPACore(torch.nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        t = (
            x.flatten(2).unflatten(1, (self.heads, -1)).transpose(-1, -2).contiguous()
        )  # (B, heads, H*W, C / heads): the fused kernel wants unit-stride channels
        return F.scaled_dot_product_attention(t, t, t).transpose(-1, -2).reshape(x.shape)
