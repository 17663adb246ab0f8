"""Multi-head self-attention with quadratic position encoding (Cordonnier, Loukas and Jaggi, 2020),
as a bottleneck mixer.

Every pixel attends over the whole map. Head h adds to its content logit q . k / sqrt(d) the
position logit -alpha_h ||delta - Delta_h||^2 of the offset delta = key - query, with a learned
centre Delta_h and a learned sharpness alpha_h: a head looks around one offset, and as alpha_h grows
it attends to exactly the pixel at that offset. With k^2 heads whose centres are the k x k offsets,
no content logits, identity value maps and the output projection cut from a convolution's kernel,
the layer is that k x k convolution (the paper's Theorem 1; ``from_convolution`` builds it, the
tests check it away from the borders, where the convolution's zero padding has no counterpart).

The position logit is a row term plus a column term, -alpha_h (dy - Delta_h,y)^2 - alpha_h (dx -
Delta_h,x)^2, so the fast path (``impl="fast"``) is the blocked-attention op over one block of all
pixels (``sasa.ops.blocked_attention``: no (H W)^2 logits stored) with those two terms as its row
and column biases; the reference materialises the logits, and the FLOP counter counts through it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sasa.layers._checks import check_choice, check_divisible, check_positive_int
from sasa.layers._kernels import kernel
from sasa.layers.blocked import global_axis, index_tables
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d
from sasa.ops.blocked_attention import BLOCKED_ATTENTION_IMPLS


@register_mixer("quadratic", paper="Quadratic encoding (Cordonnier et al., 2020)", marker="$q$")
class QuadraticAttention2d(nn.Module):
    counted_impl = "reference"

    def __init__(
        self, in_channels, out_channels, stride=1, *, heads=8, value_dim=None, content=True, init_alpha=1.0, impl="fast"
    ):
        super().__init__()
        check_choice("impl", impl, tuple(BLOCKED_ATTENTION_IMPLS))
        self.impl = impl
        check_positive_int("heads", heads)
        check_divisible("out_channels", out_channels, heads, f"split over heads={heads}")
        check_choice("stride", stride, (1, 2))
        self.in_channels, self.out_channels, self.stride, self.heads, self.content = (
            in_channels,
            out_channels,
            stride,
            heads,
            content,
        )
        self.head_dim = out_channels // heads
        self.value_dim = value_dim or self.head_dim
        check_positive_int("value_dim", self.value_dim)
        self.qk = nn.Conv2d(in_channels, 2 * out_channels, 1, bias=False) if content else None
        self.v = nn.Conv2d(in_channels, heads * self.value_dim, 1, bias=False)
        self.proj = nn.Conv2d(heads * self.value_dim, out_channels, 1, bias=False)
        # centres drawn around the pixel (a standard normal), one sharpness for all heads
        self.centre = nn.Parameter(torch.randn(heads, 2))
        self.log_alpha = nn.Parameter(torch.full((heads,), float(torch.log(torch.tensor(init_alpha)))))
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def position_logits(self, H, W):
        """(heads, HW, HW): -alpha_h ||(key - query) - Delta_h||^2."""
        y, x = torch.meshgrid(
            torch.arange(H, device=self.centre.device), torch.arange(W, device=self.centre.device), indexing="ij"
        )
        pos = torch.stack([y.flatten(), x.flatten()], -1).to(self.centre.dtype)  # (HW, 2)
        delta = pos[None, :, :] - pos[:, None, :]  # (query, key, 2)
        dist = ((delta[None] - self.centre[:, None, None, :]) ** 2).sum(-1)
        return -self.log_alpha.exp()[:, None, None] * dist

    def forward(self, x):
        attend = self._reference if kernel(self) == "reference" else self._blocked
        return self.pool(self.proj(attend(x)))

    def _qkv(self, x):
        B, _, H, W = x.shape
        v = self.v(x).view(B, self.heads, self.value_dim, H * W)
        if not self.content:
            return None, None, v
        q, k = self.qk(x).view(B, 2, self.heads, self.head_dim, H * W).unbind(1)
        return q * self.head_dim**-0.5, k, v

    def _blocked(self, x):
        B, _, H, W = x.shape
        q, k, v = self._qkv(x)
        if q is None:  # position logits only: zero content logits
            q = k = x.new_zeros(B, self.heads, 1, H * W)
        alpha = self.log_alpha.exp()[:, None, None]

        def axis_bias(n, centre):
            """(heads, n query positions, n key positions): -alpha (key - query - centre)^2 on one axis."""
            pos = torch.arange(n, device=x.device, dtype=x.dtype)
            return -alpha * (pos[None, None, :] - pos[None, :, None] - centre[:, None, None]) ** 2

        row = axis_bias(H, self.centre[:, 0]).repeat_interleave(W, dim=1)  # query (i, j) reads row i's term
        col = axis_bias(W, self.centre[:, 1]).repeat(1, H, 1)  # and column j's
        queries, keys = index_tables(global_axis(H, 1, x.dtype, x.device), global_axis(W, 1, x.dtype, x.device), H, W)
        out = BLOCKED_ATTENTION_IMPLS[self.impl](
            q,
            k,
            v,
            queries,
            keys,
            row.expand(B, -1, -1, -1).reshape(B * self.heads, H * W, H),
            col.expand(B, -1, -1, -1).reshape(B * self.heads, H * W, W),
        )
        return out.reshape(B, -1, H, W)

    def _reference(self, x):
        B, _, H, W = x.shape
        q, k, v = self._qkv(x)
        logits = self.position_logits(H, W).unsqueeze(0)  # (1, heads, HW, HW)
        if q is not None:
            logits = logits + torch.einsum("bhdq,bhdk->bhqk", q, k)
        return torch.einsum("bhqk,bhdk->bhdq", logits.softmax(-1), v).reshape(B, -1, H, W)

    @classmethod
    def from_convolution(cls, weight, alpha=50.0, impl="fast"):
        """The layer that computes the k x k convolution with ``weight`` (out, in, k, k), zero bias,
        stride 1: one head per kernel offset, each looking at exactly that offset."""
        out_channels, in_channels, k, _ = weight.shape
        layer = cls(in_channels, k * k, heads=k * k, value_dim=in_channels, content=False, impl=impl).to(weight.dtype)
        layer.proj = nn.Conv2d(k * k * in_channels, out_channels, 1, bias=False).to(weight.dtype)
        with torch.no_grad():
            offsets = (
                torch.stack(torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij"), -1).reshape(-1, 2) - k // 2
            )
            layer.centre.copy_(offsets)
            layer.log_alpha.fill_(float(torch.log(torch.tensor(alpha))))
            layer.v.weight.copy_(torch.eye(in_channels, dtype=weight.dtype).repeat(k * k, 1)[:, :, None, None])
            # head h = (i, j) carries the input at offset (i - k//2, j - k//2): the kernel's tap (i, j)
            layer.proj.weight.copy_(weight.permute(0, 2, 3, 1).reshape(out_channels, -1)[:, :, None, None])
        layer.out_channels = out_channels
        return layer

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, heads={self.heads}, "
            f"content={self.content}, impl={self.impl!r}"
        )
