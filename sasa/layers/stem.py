"""The stems: the ResNet convolution stem and the paper's three attention stems (its stem
ablation): values by a 1x1 projection (``attention_plain``), by a 3x3 convolution
(``attention_conv_values``), or spatially aware (``attention``, the paper's choice).

Both downsample by 4 at ImageNet resolution (``small_input=False``) and by 1 for 28-32 px data,
so that the last group of a ResNet still sees a 4x4 map (28 -> 28, 14, 7, 4) instead of 1x1.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_choice, check_divisible, check_positive_int
from sasa.layers._kernels import kernel
from sasa.layers.blocked import blocked_attention_2d, halo_axis
from sasa.layers.sasa2d import add_relative_embeddings
from sasa.ops.blocked_attention import BLOCKED_ATTENTION_IMPLS

VALUES = ("spatially_aware", "plain", "conv")
CONV_VALUES_KERNEL = 3  # the paper does not give the size of its "spatial convolution for the values"


class StemAttention2d(nn.Module):
    """Attention of every pixel over its ``block_size`` x ``block_size`` tile of the image: the
    paper's attention stem, with the three ways of computing the values of its stem ablation.

    - ``values='spatially_aware'`` (the paper's stem): the value of memory pixel (a, b) is a
      position-dependent mixture of ``mixtures`` value projections, v_ab = sum_m p(a, b, m) W_V^m
      x_ab, p(a, b, .) = softmax_m((emb_row(a) + emb_col(b)) . nu_m), (a, b) the position in the tile;
    - ``'plain'``: plain stand-alone attention, v_ab = W_V x_ab;
    - ``'conv'``: a 3x3 convolution of the image computes the values (zero-padded at its borders).

    Logits are q.k plus, with ``pos_enc='relative'``, the row/column-offset term of
    :class:`sasa.SASA2d`. Tiles that overhang the image are padded, and the padded keys masked out.
    ``impl="reference"`` computes it on gathered tiles; ``"fast"`` (default) as blocks of
    ``sasa.layers.blocked`` (halo blocks with no halo), never storing the logits.
    """

    counted_impl = "reference"  # the FLOP counter sees its matrix products

    def __init__(
        self,
        in_channels,
        out_channels,
        block_size=4,
        heads=8,
        mixtures=4,
        pos_enc="relative",
        values="spatially_aware",
        impl="fast",
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("block_size", block_size),
            ("heads", heads),
            ("mixtures", mixtures),
        ):
            check_positive_int(name, value)
        check_choice("pos_enc", pos_enc, ("relative", "none"))
        check_choice("values", values, VALUES)
        check_choice("impl", impl, tuple(BLOCKED_ATTENTION_IMPLS))
        check_divisible("out_channels", out_channels, heads, f"split over heads={heads}")
        self.head_dim = out_channels // heads
        if pos_enc == "relative":
            check_divisible("out_channels", out_channels, 2 * heads, "row and column halves of each head's embedding")
        self.out_channels, self.block_size, self.heads, self.value_kind, self.impl = (
            out_channels,
            block_size,
            heads,
            values,
            impl,
        )
        self.qk = nn.Conv2d(in_channels, 2 * out_channels, 1, bias=False)
        if values == "spatially_aware":
            self.mixtures = mixtures
            self.values = nn.Conv2d(in_channels, mixtures * out_channels, 1, bias=False)
            self.emb_row = nn.Parameter(torch.randn(block_size, out_channels) * out_channels**-0.5)
            self.emb_col = nn.Parameter(torch.randn(block_size, out_channels) * out_channels**-0.5)
            self.mixture_logits = nn.Parameter(torch.randn(mixtures, out_channels) * out_channels**-0.5)  # nu_m
        else:
            kernel = CONV_VALUES_KERNEL if values == "conv" else 1
            self.values = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
        # offsets -(b-1) .. b-1 inside a tile
        add_relative_embeddings(self, heads, self.head_dim, 2 * block_size - 1, pos_enc == "relative")

    def _tiles(self, t):
        """(B, C, Hp, Wp) -> (B, nH*nW, b*b, C): one row per tile, pixels in row-major order."""
        B, C, Hp, Wp = t.shape
        b = self.block_size
        t = t.view(B, C, Hp // b, b, Wp // b, b).permute(0, 2, 4, 3, 5, 1)
        return t.reshape(B, (Hp // b) * (Wp // b), b * b, C)

    def _relative(self):
        """(heads, head_dim, b*b queries, b*b keys): r for every pair of positions in a tile."""
        b = self.block_size
        pos = torch.arange(b, device=self.rel_row.device)
        offset = pos[None, :] - pos[:, None] + b - 1  # [query, key] -> index of (key - query)
        rows = self.rel_row[:, :, offset][:, :, :, None, :, None].expand(-1, -1, b, b, b, b)
        cols = self.rel_col[:, :, offset][:, :, None, :, None, :].expand(-1, -1, b, b, b, b)
        return torch.cat([rows, cols], dim=1).reshape(self.heads, self.head_dim, b * b, b * b)

    def _mixture(self):
        """(b, b, mixtures): p(a, b, .) of the spatially aware values."""
        return ((self.emb_row[:, None] + self.emb_col[None, :]) @ self.mixture_logits.t()).softmax(-1)

    def forward(self, x):
        return getattr(self, f"_{kernel(self)}")(x)

    def _fast(self, x):
        B, _, H, W = x.shape
        b = self.block_size
        q, k = self.qk(x).view(B, 2, self.heads, self.head_dim, H, W).unbind(1)
        v = self.values(x)
        if self.value_kind == "spatially_aware":  # pixel (y, x) mixes by its place in its tile
            weights = self._mixture()[torch.arange(H, device=x.device) % b][:, torch.arange(W, device=x.device) % b]
            v = torch.einsum("bmcyx,yxm->bcyx", v.view(B, self.mixtures, self.out_channels, H, W), weights)
        rows, cols = (halo_axis(n, b, 0, x.dtype, x.device) for n in (H, W))
        v = v.view(B, self.heads, self.head_dim, H, W)
        return blocked_attention_2d(q, k, v, rows, cols, self.rel_row, self.rel_col).reshape(B, self.out_channels, H, W)

    def _reference(self, x):
        B, _, H, W = x.shape
        b, heads, hd = self.block_size, self.heads, self.head_dim
        pad_h, pad_w = -H % b, -W % b
        x = F.pad(x, (0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        q, k = self._tiles(self.qk(x)).view(B, -1, b * b, 2, heads, hd).permute(3, 0, 1, 4, 2, 5)  # (B, T, h, b*b, hd)
        v = self._tiles(self.values(x))  # the right/bottom zero padding is the conv's own (values='conv')
        if self.value_kind == "spatially_aware":
            mix = self._mixture().view(b * b, self.mixtures)
            v = torch.einsum("btpmc,pm->btpc", v.view(B, -1, b * b, self.mixtures, self.out_channels), mix)
        v = v.reshape(B, -1, b * b, heads, hd).transpose(2, 3)
        logits = q @ k.transpose(-1, -2)
        if self.rel_row is not None:
            logits = logits + torch.einsum("bthpd,hdpq->bthpq", q, self._relative())
        if pad_h or pad_w:
            inside = F.pad(x.new_ones(1, 1, H, W), (0, pad_w, 0, pad_h))
            logits = logits.masked_fill(self._tiles(inside).view(1, -1, 1, 1, b * b) == 0, float("-inf"))
        out = logits.softmax(-1) @ v  # (B, T, h, b*b, hd)
        out = out.view(B, Hp // b, Wp // b, heads, b, b, hd).permute(0, 3, 6, 1, 4, 2, 5)
        return out.reshape(B, self.out_channels, Hp, Wp)[:, :, :H, :W]


def conv_stem(in_chans, out_channels, *, small_input=False, **_):
    """ResNet stem: 7x7/2 conv + 3x3/2 max pool, or a 3x3/1 conv for small inputs."""
    if small_input:
        layers = [("conv", nn.Conv2d(in_chans, out_channels, 3, 1, 1, bias=False))]
    else:
        layers = [("conv", nn.Conv2d(in_chans, out_channels, 7, 2, 3, bias=False))]
    layers += [("bn", nn.BatchNorm2d(out_channels)), ("act", nn.ReLU(inplace=True))]
    if not small_input:
        layers.append(("pool", nn.MaxPool2d(3, 2, 1)))
    return nn.Sequential(OrderedDict(layers))


def attention_stem(
    in_chans,
    out_channels,
    *,
    small_input=False,
    heads=8,
    pos_enc="relative",
    mixtures=4,
    values="spatially_aware",
    impl="fast",
    **_,
):
    """The paper's stem: 4x4-tile attention (spatially-aware values unless ``values`` says
    otherwise), batch norm, 4x4 max pool (no pool for small inputs). The paper applies no ReLU
    between them; neither do we. ``absolute`` falls back to ``none`` here: the values' mixing or
    convolution already knows positions, and the ablation compares the values alone."""
    pos_enc = "relative" if pos_enc == "relative" else "none"
    layers = [
        ("attn", StemAttention2d(in_chans, out_channels, 4, heads, mixtures, pos_enc, values, impl)),
        ("bn", nn.BatchNorm2d(out_channels)),
    ]
    if not small_input:
        layers.append(("pool", nn.MaxPool2d(4, 4, ceil_mode=True)))
    return nn.Sequential(OrderedDict(layers))


STEMS = {
    "conv": conv_stem,
    "attention": attention_stem,
    "attention_plain": partial(attention_stem, values="plain"),
    "attention_conv_values": partial(attention_stem, values="conv"),
}
STEM_STRIDE = {False: 4, True: 1}  # keyed by small_input
