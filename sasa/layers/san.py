"""SAN's vector self-attention (Zhao, Jia & Koltun, "Exploring Self-attention for Image
Recognition", CVPR 2020) as spatial mixers: y_i = sum_{j in R(i)} alpha(x_R(i))_j * beta(x_j).

Unlike SASA's scalar (per-head) attention, alpha gives a weight *vector* per footprint position,
so different channels mix the footprint differently; one weight channel serves ``share``
consecutive value channels. R(i) is the k x k footprint around pixel i. Pairwise weights are a
softmax over the footprint; patchwise weights are used as gamma makes them, unnormalised, as in the
authors' code (``softmax=True`` normalises them too). Footprint positions outside the image are
masked (out of the softmax, or to weight zero), as SASA masks its windows, so a border pixel
attends over the in-image part of its footprint; SAN pads by reflection instead, so its border
pixels give weight to mirrored copies of in-image pixels. Masked positions still pass through
gamma (with zeros for psi's features), so in training gamma's batch-norm statistics include
them. SAN's phi, psi and beta have biases; these have none, except beta where the weights are
not normalised (see below).

psi's footprints are materialised with ``F.unfold`` (SAN's MLP takes every (pixel, footprint
position) pair as input, so its input is O(k^2 C/reduction H W) however it is built). The weighted
sum of the values (``sasa.ops.footprint_aggregate``) has two kernels: ``impl="reference"`` unfolds
the values too (k^2 out_channels H W) and takes an einsum, which ``torch.utils.flop_counter``
counts exactly (k^2 out_channels multiply-adds per pixel; models are counted through it);
``"fast"`` (default) reads shifted rows of the values instead (SAN has CUDA kernels for this).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_choice, check_divisible, check_odd_kernel, check_positive_int
from sasa.layers._kernels import kernel
from sasa.layers.registry import register_mixer
from sasa.layers.sasa2d import CeilAvgPool2d
from sasa.ops.footprint_aggregate import FOOTPRINT_AGGREGATE_IMPLS


class _VectorAttention2d(nn.Module):
    """What both SAN mixers share: the 1x1 maps phi, psi (to out_channels // reduction) and beta
    (to out_channels), footprint gathering, the masked (softmax) weights over the footprint, the
    weighted sum with weight sharing, and the optional stride-2 pool."""

    counted_impl = "reference"  # the FLOP counter sees its einsum

    def __init__(self, in_channels, out_channels, stride, kernel_size, share, reduction, impl, softmax):
        super().__init__()
        check_choice("softmax", softmax, (False, True))
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        check_choice("stride", stride, (1, 2))
        check_odd_kernel("kernel_size", kernel_size)
        check_positive_int("share", share)
        check_positive_int("reduction", reduction)
        check_choice("impl", impl, tuple(FOOTPRINT_AGGREGATE_IMPLS))
        check_divisible(
            "out_channels", out_channels, share, f"share={share} value channels use each attention weight channel"
        )
        check_divisible(
            "out_channels",
            out_channels,
            reduction,
            f"reduction={reduction} sets the relation width out_channels // reduction",
        )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.kernel_size, self.share, self.reduction, self.impl, self.softmax = (
            kernel_size,
            share,
            reduction,
            impl,
            softmax,
        )
        self.rel_channels = out_channels // reduction
        self.weight_channels = out_channels // share
        # No biases: phi's and psi's would shift gamma's input by a constant, which its first
        # batch norm absorbs; softmax weights sum to 1, so beta's would only shift the output.
        # Unnormalised weights scale beta's bias pixel by pixel: then it is kept, as SAN has it.
        self.phi = nn.Conv2d(in_channels, self.rel_channels, 1, bias=False)
        self.psi = nn.Conv2d(in_channels, self.rel_channels, 1, bias=False)
        self.beta = nn.Conv2d(in_channels, out_channels, 1, bias=not softmax)
        self.pool = CeilAvgPool2d() if stride == 2 else nn.Identity()

    def footprint(self, t):
        """(B, C, H, W) -> (B, C, k*k, H*W): the footprint of every pixel, zeros outside the image."""
        k = self.kernel_size
        return F.unfold(t, k, padding=k // 2).view(t.shape[0], t.shape[1], k * k, -1)

    def aggregate(self, logits, x):
        """Weights from ``logits`` (B, out_channels // share, k*k, H*W): a masked softmax over the
        footprint, or the logits with out-of-image positions zeroed; then the weighted sum of
        beta(x_j), weight channel g serving value channels g*share ... g*share + share - 1.
        Returns (B, out_channels, H_out, W_out)."""
        B, _, H, W = x.shape
        inside = self.footprint(x.new_ones(1, 1, H, W)) > 0
        attn = logits.masked_fill(~inside, float("-inf")).softmax(dim=2) if self.softmax else logits * inside
        attn = attn.view(B, self.weight_channels, -1, H, W)
        return self.pool(FOOTPRINT_AGGREGATE_IMPLS[kernel(self)](attn, self.beta(x), self.kernel_size))

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, kernel_size={self.kernel_size}, "
            f"share={self.share}, reduction={self.reduction}, softmax={self.softmax}, impl={self.impl!r}"
        )


@register_mixer(
    "san_pairwise", paper="SAN (Zhao et al., 2020), pairwise", marker="h", test_options={"share": 2, "reduction": 2}
)
class SANPairwise2d(_VectorAttention2d):
    """SAN's pairwise vector attention: alpha(x_i, x_j) = gamma([phi(x_i) - psi(x_j), p(j - i)]).

    The relation is subtraction, SAN's best. p is the position encoding: the (dy, dx) offset of
    j from i divided by k // 2 (so in [-1, 1], independent of the image size) times a 2x2 matrix,
    ``position`` (SAN's 1x1 conv 2->2 applied to normalised coordinates and subtracted: its bias
    cancels). gamma = BN-ReLU-1x1 conv (rel_channels+2 -> rel_channels)-BN-ReLU-1x1 conv
    (-> out_channels // share), as in SAN, applied to every (pixel, footprint position) pair.
    With ``stride=2`` a ceil-mode 2x2/2 average pool follows, as in ``SASA2d``.
    """

    def __init__(self, in_channels, out_channels, stride=1, *, kernel_size=7, share=8, reduction=8, impl="fast"):
        super().__init__(in_channels, out_channels, stride, kernel_size, share, reduction, impl, softmax=True)
        r = self.rel_channels
        self.position = nn.Conv2d(2, 2, 1, bias=False)
        self.gamma = nn.Sequential(
            nn.BatchNorm2d(r + 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(r + 2, r, 1, bias=False),
            nn.BatchNorm2d(r),
            nn.ReLU(inplace=True),
            nn.Conv2d(r, self.weight_channels, 1),
        )
        c = kernel_size // 2
        steps = (torch.arange(kernel_size, dtype=torch.float32) - c) / max(c, 1)
        offsets = torch.stack(torch.meshgrid(steps, steps, indexing="ij"))  # (2, k, k): (dy, dx)
        self.register_buffer("offsets", offsets[None], persistent=False)

    def forward(self, x):
        B, _, H, W = x.shape
        kk = self.kernel_size**2
        relation = self.phi(x).view(B, self.rel_channels, 1, H * W) - self.footprint(self.psi(x))
        pos = self.position(self.offsets).view(1, 2, kk, 1).expand(B, 2, kk, H * W)
        return self.aggregate(self.gamma(torch.cat([relation, pos], dim=1)), x)


@register_mixer(
    "san_patchwise", paper="SAN (Zhao et al., 2020), patchwise", marker="H", test_options={"share": 2, "reduction": 2}
)
class SANPatchwise2d(_VectorAttention2d):
    """SAN's patchwise vector attention: alpha(x_R(i)) = gamma([phi(x_i), psi(x_j) for j in R(i)]),
    one weight vector per footprint position computed from the whole patch (SAN's concatenation
    relation; the position of j is implicit in where psi(x_j) sits, so no position encoding).

    gamma's input is phi(x_i) followed by psi's footprint channel-major (channel c of footprint
    position n at c*k*k + n, as ``F.unfold`` lays it out; zeros outside the image). gamma =
    BN-ReLU-1x1 conv (-> out_channels // share)-BN-ReLU-1x1 conv (-> (out_channels // share) *
    k*k, weight channel g of position n at g*k*k + n), as in SAN. Its weights are not normalised, as
    in the authors' code (their pairwise weights are, through a softmax); ``softmax=True`` normalises
    them over the footprint. With ``stride=2`` a ceil-mode 2x2/2 average pool follows, as in
    ``SASA2d``.
    """

    def __init__(
        self, in_channels, out_channels, stride=1, *, kernel_size=3, share=8, reduction=8, softmax=False, impl="fast"
    ):
        super().__init__(in_channels, out_channels, stride, kernel_size, share, reduction, impl, softmax)
        width, g, kk = self.rel_channels * (kernel_size**2 + 1), self.weight_channels, kernel_size**2
        self.gamma = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, g, 1, bias=False),
            nn.BatchNorm2d(g),
            nn.ReLU(inplace=True),
            nn.Conv2d(g, g * kk, 1),
        )

    def forward(self, x):
        B, _, H, W = x.shape
        patch = torch.cat([self.phi(x).flatten(2), self.footprint(self.psi(x)).flatten(1, 2)], dim=1)
        logits = self.gamma(patch.view(B, -1, H, W)).view(B, self.weight_channels, self.kernel_size**2, H * W)
        return self.aggregate(logits, x)
