"""Global (all-pixel) relative self-attention mixers: BoTNet's MHSA and attention-augmented conv.

Both fill the 3x3 position of a ResNet bottleneck, like SASA2d, but every pixel attends over the
whole feature map instead of a k x k window. They share ``relative_global_attention``, the
reference, written in einsums only so that ``torch.utils.flop_counter`` counts it exactly (models
are counted through it), and its fast path ``fast_relative_global_attention``: one block of all
pixels in ``sasa.layers.blocked``, which never stores the (H W)^2 logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sasa.layers._checks import check_choice, check_divisible, check_positive_int
from sasa.layers._kernels import kernel
from sasa.layers.blocked import blocked_attention_2d, global_axis
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d, add_relative_embeddings

GLOBAL_POS_ENCODINGS = ("relative", "none")


def _clipped_offsets(n, max_extent, device):
    """(n, n) embedding index of offset (memory - query), clipped to +-(max_extent - 1)."""
    pos = torch.arange(n, device=device)
    return (pos[None, :] - pos[:, None]).clamp(-(max_extent - 1), max_extent - 1) + max_extent - 1


def relative_global_attention(q, k, v, rel_row=None, rel_col=None):
    """Multi-head softmax attention of every pixel over all H*W pixels, with 2-D relative logits.

    q, k: (B, heads, dk, H, W); v: (B, heads, dv, H, W) -> (B, heads, dv, H, W). The logit of
    query pixel (i, j) for memory pixel (a, b) is q_ij . k_ab + q_ij . [rel_row[a-i]; rel_col[b-j]],
    with q scaled by dk**-0.5 first (dk per head), as BoTNet and attention-augmented convolution
    do, so it scales both terms. ``rel_row``, ``rel_col``: (heads, dk/2, 2*max_extent - 1), offset
    o at index o + max_extent - 1; offsets beyond +-(max_extent - 1) share the last embedding, so
    one set of parameters serves any resolution. ``rel_row=None``: content logits only.

    The relative term is computed per axis, q_row . rel_row[a-i] for every (i, j, a) and
    q_col . rel_col[b-j] for every (i, j, b): H*W*(H+W)*dk/2 multiply-adds per head, against
    (H*W)^2 * dk for the content logits.
    """
    logits = relative_global_logits(q, k, rel_row, rel_col)
    B, heads, _, H, W = q.shape
    out = torch.einsum("bhnm,bhcm->bhcn", logits.softmax(dim=-1), v.flatten(3))
    return out.view(B, heads, v.shape[2], H, W)


def relative_global_logits(q, k, rel_row=None, rel_col=None):
    """(B, heads, H W, H W): the logits of ``relative_global_attention``."""
    B, heads, dk, H, W = q.shape
    q = q * dk**-0.5
    logits = torch.einsum("bhcn,bhcm->bhnm", q.flatten(3), k.flatten(3))
    if rel_row is not None:
        half, max_extent = rel_row.shape[1], (rel_row.shape[2] + 1) // 2
        emb_row = rel_row[:, :, _clipped_offsets(H, max_extent, q.device)]  # (heads, dk/2, i, a)
        emb_col = rel_col[:, :, _clipped_offsets(W, max_extent, q.device)]  # (heads, dk/2, j, b)
        row = torch.einsum("nhcij,hcia->nhija", q[:, :, :half], emb_row)
        col = torch.einsum("nhcij,hcjb->nhijb", q[:, :, half:], emb_col)
        logits = logits.view(B, heads, H, W, H, W) + row[..., :, None] + col[..., None, :]
        logits = logits.view(B, heads, H * W, H * W)
    return logits


def fast_relative_global_attention(q, k, v, rel_row=None, rel_col=None):
    """The same function as ``relative_global_attention``, as one block of all pixels."""
    H, W = q.shape[-2:]
    max_extent = (rel_row.shape[2] + 1) // 2 if rel_row is not None else 1
    rows, cols = (global_axis(n, max_extent, q.dtype, q.device) for n in (H, W))
    return blocked_attention_2d(q * q.shape[2] ** -0.5, k, v, rows, cols, rel_row, rel_col)


GLOBAL_ATTENTION_IMPLS = {"reference": relative_global_attention, "fast": fast_relative_global_attention}


def _check_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


class _RelativeGlobalAttention(nn.Module):
    """Holds the qkv projection and the relative embeddings; subclasses check their arguments.
    ``impl``: ``fast`` (default) or ``reference``, the same function.

    ``evolve`` = alpha > 0 makes the attention evolving (Wang et al., 2021): a layer's logits become
    alpha * conv3x3(the previous layer's logits) + (1 - alpha) * its own, the (queries x keys) maps
    read as images with the heads as channels, where the previous block of the same ResNet group
    has an evolving layer whose maps have the same size (``follow``; the ResNet links them). Such a
    layer materialises its logits, so it runs the reference path whatever ``impl`` says."""

    counted_impl = "reference"  # the FLOP counter sees its einsums

    def _build_attention(self, in_channels, dk, dv, heads, max_extent, pos_enc, impl, evolve=0.0):
        check_choice("impl", impl, tuple(GLOBAL_ATTENTION_IMPLS))
        if isinstance(evolve, bool) or not isinstance(evolve, (int, float)) or not 0 <= evolve <= 1:
            raise ValueError(f"evolve must be a number in [0, 1] (0: off), got {evolve!r}")
        self.heads, self.max_extent, self.pos_enc, self.impl, self.evolve = heads, max_extent, pos_enc, impl, evolve
        self.dk, self.dv = dk, dv
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1, bias=False)
        add_relative_embeddings(self, heads, dk // heads, 2 * max_extent - 1, pos_enc == "relative")
        if evolve:
            self.evolve_conv = nn.Conv2d(heads, heads, 3, padding=1)
            self._previous, self._successor, self._handoff = (), False, None  # a tuple: not a submodule

    def follow(self, previous):
        """Evolve from ``previous``'s logits (the mixer of the block before, same group)."""
        if (
            self.evolve
            and isinstance(previous, _RelativeGlobalAttention)
            and previous.evolve
            and previous.heads == self.heads
        ):
            self._previous, previous._successor = (previous,), True

    def _attend(self, x):
        """(B, in, H, W) -> (B, dv, H, W)."""
        B, _, H, W = x.shape
        q, k, v = self.qkv(x).split([self.dk, self.dk, self.dv], dim=1)
        q, k = (t.reshape(B, self.heads, self.dk // self.heads, H, W) for t in (q, k))
        v = v.reshape(B, self.heads, self.dv // self.heads, H, W)
        if self.evolve:
            return self._evolving_attention(q, k, v).reshape(B, self.dv, H, W)
        return GLOBAL_ATTENTION_IMPLS[kernel(self)](q, k, v, self.rel_row, self.rel_col).reshape(B, self.dv, H, W)

    def _evolving_attention(self, q, k, v):
        logits = relative_global_logits(q, k, self.rel_row, self.rel_col)
        previous = self._previous[0]._handoff if self._previous else None
        if previous is not None and previous.shape == logits.shape:
            logits = self.evolve * self.evolve_conv(previous) + (1 - self.evolve) * logits
        if self._previous:
            self._previous[0]._handoff = None
        self._handoff = logits if self._successor else None
        out = torch.einsum("bhnm,bhcm->bhcn", logits.softmax(dim=-1), v.flatten(3))
        return out.view(*v.shape)


def _check_common(in_channels, out_channels, stride, heads, max_extent, pos_enc):
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    check_choice("stride", stride, (1, 2))
    check_positive_int("heads", heads)
    check_positive_int("max_extent", max_extent)
    check_choice("pos_enc", pos_enc, GLOBAL_POS_ENCODINGS)


@register_mixer("bot", paper="BoTNet (Srinivas et al., 2021)", marker="X", test_options={"max_extent": 4}, groups=(4,))
class BoTAttention2d(_RelativeGlobalAttention):
    """BoTNet's multi-head self-attention (Srinivas et al., 2021): every pixel attends over the
    whole map, with 2-D relative position logits (``pos_enc="relative"``) or none (``"none"``,
    then the layer is permutation-equivariant over pixels).

    q, k, v are one 1x1 projection to out_channels each (no bias: batch norm follows in the
    bottleneck); no output projection (the bottleneck's next 1x1 conv plays that part). With
    ``stride=2`` a 2x2/2 average pool follows the attention, as in BoTNet (ceil mode, so sizes
    match a padded 3x3/2 conv). Relative embeddings are per head, dk/2 wide per axis, like SASA's
    (BoTNet's code shares one full-width embedding per axis across heads), and are clipped at
    ``max_extent`` instead of being sized to one resolution.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        stride=1,
        *,
        heads=4,
        max_extent=16,
        pos_enc="relative",
        impl="fast",
        evolve=0.0,
    ):
        super().__init__()
        _check_common(in_channels, out_channels, stride, heads, max_extent, pos_enc)
        check_divisible("out_channels", out_channels, heads, f"split over heads={heads}")
        if pos_enc == "relative":
            check_divisible(
                "out_channels",
                out_channels,
                2 * heads,
                f"each of the {heads} heads splits its relative logits into row and column halves",
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self._build_attention(in_channels, out_channels, out_channels, heads, max_extent, pos_enc, impl, evolve)
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def forward(self, x):
        return self.pool(self._attend(x))

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, heads={self.heads}, "
            f"max_extent={self.max_extent}, pos_enc={self.pos_enc!r}, impl={self.impl!r}"
        )


@register_mixer(
    "aa",
    paper="Attention-augmented convolution (Bello et al., 2019)",
    marker="<",
    test_options={"max_extent": 4, "dk_fraction": 0.5, "dv_fraction": 0.5},
)
class AttentionAugmentedConv2d(_RelativeGlobalAttention):
    """Attention-augmented convolution (Bello et al., 2019): a 3x3 conv with out_channels - dv
    outputs concatenated with dv channels of global relative multi-head self-attention, so the
    layer keeps the conv's locality and adds all-pixel context.

    dk and dv are dk_fraction and dv_fraction of out_channels, rounded to the nearest multiple of
    what the heads need (2 x heads for dk with relative logits, heads otherwise; at least one), so
    the fractions work at every ResNet width; the defaults (dk = 0.2, dv = 0.1 of the outputs,
    8 heads) are the paper's ResNet setting. The attention
    output goes through a 1x1 dv -> dv projection as in the paper. No biases (batch norm follows).
    The relative embeddings are SASA's: per head and half width (rows score the first half of a
    head's key channels, columns the second); Bello et al. share one full-width embedding per axis
    across the heads and add both to the whole key. Logits are scaled by 1/sqrt(dk per head), as
    theirs.
    With ``stride=2`` the conv is strided; the attention runs at the input resolution and a 2x2/2
    ceil-mode average pool brings it to the conv's output size. The pool comes before the
    projection: both are linear and bias-free, so the order does not change the result and
    projecting the pooled map is cheaper.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        stride=1,
        *,
        heads=8,
        dk_fraction=0.2,
        dv_fraction=0.1,
        max_extent=16,
        pos_enc="relative",
        impl="fast",
        evolve=0.0,
    ):
        super().__init__()
        _check_common(in_channels, out_channels, stride, heads, max_extent, pos_enc)
        _check_fraction("dk_fraction", dk_fraction)
        _check_fraction("dv_fraction", dv_fraction)
        dk_step = 2 * heads if pos_enc == "relative" else heads  # relative logits split each head's keys in halves
        dk = max(1, round(dk_fraction * out_channels / dk_step)) * dk_step
        dv = max(1, round(dv_fraction * out_channels / heads)) * heads
        if dv >= out_channels:
            raise ValueError(
                f"dv_fraction={dv_fraction} gives dv={dv} attention channels (a multiple of heads={heads}), "
                f"leaving none of out_channels={out_channels} for the convolution"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.dk_fraction, self.dv_fraction = dk_fraction, dv_fraction
        self.conv = nn.Conv2d(in_channels, out_channels - dv, 3, stride, 1, bias=False)
        self._build_attention(in_channels, dk, dv, heads, max_extent, pos_enc, impl, evolve)
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()
        self.proj = nn.Conv2d(dv, dv, 1, bias=False)

    def forward(self, x):
        return torch.cat([self.conv(x), self.proj(self.pool(self._attend(x)))], dim=1)

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, heads={self.heads}, "
            f"dk_fraction={self.dk_fraction}, dv_fraction={self.dv_fraction} (dk={self.dk}, dv={self.dv}), "
            f"max_extent={self.max_extent}, pos_enc={self.pos_enc!r}, impl={self.impl!r}"
        )
