"""QnA, learned queries for local attention (Arar et al., 2022), as a bottleneck mixer.

Each head has ``queries`` learned query vectors, shared by every window. A window's output for one
query is softmax attention of that query over the window's keys, with a learned bias per window
offset and head, applied to the values; the queries' outputs are concatenated and mixed by a 1x1
projection. Because the query does not depend on the window's pixel, its logit for a key is the
same in every window that contains the key: one score per pixel, and the window softmax becomes two
depthwise convolutions with the kernel exp(bias), one over exp(score) x value and one over
exp(score). So the layer is shift-invariant and linear in the number of pixels (no per-window
logits), which the tests check. Keys beyond the border are left out (zero padding of both sums).
A stride of 2 pools after mixing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_choice, check_divisible, check_odd_kernel, check_positive_int
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d


@register_mixer("qna", paper="QnA (Arar et al., 2022)", marker="$Q$")
class QnA2d(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1, *, kernel_size=7, heads=4, queries=2):
        super().__init__()
        check_odd_kernel("kernel_size", kernel_size)
        check_positive_int("heads", heads)
        check_positive_int("queries", queries)
        check_divisible("out_channels", out_channels, heads, f"split over heads={heads}")
        check_choice("stride", stride, (1, 2))
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.kernel_size, self.heads, self.queries = kernel_size, heads, queries
        self.head_dim = out_channels // heads
        self.kv = nn.Conv2d(in_channels, 2 * out_channels, 1, bias=False)
        self.query = nn.Parameter(torch.randn(queries, heads, self.head_dim) * self.head_dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(queries, heads, kernel_size, kernel_size))
        self.proj = nn.Conv2d(queries * out_channels, out_channels, 1, bias=False)
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def forward(self, x):
        B, _, H, W = x.shape
        n, d, L, k = self.heads, self.head_dim, self.queries, self.kernel_size
        key, value = self.kv(x).view(B, 2, n, d, H, W).unbind(1)
        scores = torch.einsum("lnd,bndhw->blnhw", self.query * d**-0.5, key)  # one logit per (query, head, pixel)
        weights = (scores - scores.amax((-2, -1), keepdim=True)).exp()  # the shift cancels in the ratio
        kernel = self.bias.exp().reshape(L * n, 1, k, k)  # the window's offsets, as a depthwise kernel
        # conv2d correlates: output i reads input i + offset, weighted by bias[offset]
        den = F.conv2d(weights.reshape(B, L * n, H, W), kernel, padding=k // 2, groups=L * n)
        num = F.conv2d(
            (weights[:, :, :, None] * value[:, None]).reshape(B, L * n * d, H, W),
            kernel.repeat_interleave(d, 0),
            padding=k // 2,
            groups=L * n * d,
        )
        # a window whose scores all sit ~88 (float32) below the map's largest underflows to 0 / 0: read 0 there
        out = num.view(B, L, n, d, H, W) / den.clamp_min(torch.finfo(den.dtype).tiny).view(B, L, n, 1, H, W)
        return self.pool(self.proj(out.reshape(B, L * n * d, H, W)))

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, kernel_size={self.kernel_size}, "
            f"heads={self.heads}, queries={self.queries}"
        )
