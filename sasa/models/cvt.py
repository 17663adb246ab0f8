"""CvT (Wu et al., 2021): a vision transformer whose tokens come from convolutions, which timm does
not have. ``create_model("cvt13")`` is the paper's CvT-13 (19.98 M parameters at 1000 classes).

Two ideas make it a CvT rather than a ViT:

- **convolutional token embedding**: each stage starts with a strided convolution over the previous
  stage's token map (7x7 stride 4, then 3x3 stride 2), then layer norm; no position embeddings;
- **convolutional projection**: q, k and v are each a depthwise 3x3 convolution + batch norm over the
  token map, then a linear map; k and v use stride 2 (``kv_stride``), so attention reads a quarter of
  the keys.

The class token joins in the last stage only, and skips the convolutions (it has no place on the
map). One choice differs from the authors' code: logits are scaled by the head width's -1/2 power,
as the paper's equation says, where their code scales by the whole width's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_positive_int
from sasa.models.registry import register_model


class ConvEmbedding(nn.Module):
    """(B, C, H, W) -> (B, dim, H', W'): a strided convolution, then layer norm over the channels."""

    def __init__(self, in_chans, dim, kernel_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvProjection(nn.Module):
    """(B, dim, H, W) -> (B, H' W', dim): depthwise k x k convolution with ``stride``, batch norm,
    then a linear map of every token."""

    def __init__(self, dim, stride, kernel_size=3, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding=kernel_size // 2, groups=dim, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.linear = nn.Linear(dim, dim, bias=bias)

    def forward(self, x):
        return self.linear(self.norm(self.conv(x)).flatten(2).transpose(1, 2))


class ConvAttention(nn.Module):
    def __init__(self, dim, heads, kv_stride=2, qkv_bias=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dims must be divisible by heads ({dim} by {heads})")
        self.heads = heads
        self.q = ConvProjection(dim, 1, bias=qkv_bias)
        self.k = ConvProjection(dim, kv_stride, bias=qkv_bias)
        self.v = ConvProjection(dim, kv_stride, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, hw, cls_tokens=0):
        """x: (B, cls_tokens + H W, dim) -> same shape."""
        B, N, dim = x.shape
        cls, tokens = x[:, :cls_tokens], x[:, cls_tokens:]
        grid = tokens.transpose(1, 2).reshape(B, dim, *hw)
        q, k, v = (torch.cat([cls, p(grid)], 1) for p in (self.q, self.k, self.v))
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, n, d)
        # explicit products (not SDPA): torch.utils.flop_counter sees them on every device
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, dim))


class CvTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, kv_stride, qkv_bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, heads, kv_stride, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x, hw, cls_tokens):
        x = x + self.attn(self.norm1(x), hw, cls_tokens)
        return x + self.mlp(self.norm2(x))


class CvTStage(nn.Module):
    def __init__(
        self, in_chans, dim, depth, heads, embed_kernel, embed_stride, mlp_ratio, kv_stride, qkv_bias, cls_token
    ):
        super().__init__()
        self.embed = ConvEmbedding(in_chans, dim, embed_kernel, embed_stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        if cls_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(CvTBlock(dim, heads, mlp_ratio, kv_stride, qkv_bias) for _ in range(depth))

    def forward(self, x):
        """(B, C, H, W) -> the token map (B, dim, H', W') and the class token (B, dim) or None."""
        x = self.embed(x)
        B, dim, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        n_cls = 0 if self.cls_token is None else 1
        if n_cls:
            tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], 1)
        for block in self.blocks:
            tokens = block(tokens, (H, W), n_cls)
        grid = tokens[:, n_cls:].transpose(1, 2).reshape(B, dim, H, W)
        return grid, (tokens[:, 0] if n_cls else None)


class CvT(nn.Module):
    def __init__(
        self,
        depths=(1, 2, 10),
        dims=(64, 192, 384),
        heads=(1, 3, 6),
        embed_kernels=(7, 3, 3),
        embed_strides=(4, 2, 2),
        mlp_ratio=4.0,
        kv_stride=2,
        qkv_bias=True,
        num_classes=1000,
        in_chans=3,
    ):
        super().__init__()
        stages = len(depths)
        for name, value in (
            ("dims", dims),
            ("heads", heads),
            ("embed_kernels", embed_kernels),
            ("embed_strides", embed_strides),
        ):
            if len(value) != stages:
                raise ValueError(f"{name} needs one entry per stage ({stages}, as depths), got {list(value)}")
            for v in value:
                check_positive_int(name, v)
        for d in depths:
            check_positive_int("depths", d)
        check_positive_int("kv_stride", kv_stride)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_chans", in_chans)
        self.config = dict(
            depths=list(depths),
            dims=list(dims),
            heads=list(heads),
            embed_kernels=list(embed_kernels),
            embed_strides=list(embed_strides),
            mlp_ratio=mlp_ratio,
            kv_stride=kv_stride,
            qkv_bias=qkv_bias,
            num_classes=num_classes,
            in_chans=in_chans,
        )
        self.in_chans = in_chans
        self.min_input_size = 1
        chans = [in_chans, *dims]
        self.stages = nn.ModuleList(
            CvTStage(
                chans[i],
                dims[i],
                depths[i],
                heads[i],
                embed_kernels[i],
                embed_strides[i],
                mlp_ratio,
                kv_stride,
                qkv_bias,
                cls_token=i == stages - 1,
            )
            for i in range(stages)
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for stage in self.stages:
            x, cls = stage(x)
        return self.head(self.norm(cls))


def reference_conv_embedding(embed: ConvEmbedding, x):
    """The token embedding patch by patch: each output token is the linear map of its zero-padded
    k x k input patch, then layer norm. Slow; for tests."""
    conv = embed.proj
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    x = F.pad(x, (p, p, p, p))
    H, W = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
    weight = conv.weight.flatten(1)  # (dim, C k k)
    out = x.new_empty(x.shape[0], H, W, weight.shape[0])
    for i in range(H):
        for j in range(W):
            patch = x[:, :, i * s : i * s + k, j * s : j * s + k].flatten(1)
            out[:, i, j] = embed.norm(patch @ weight.t() + conv.bias)
    return out.permute(0, 3, 1, 2)


def reference_conv_projection(proj: ConvProjection, x):
    """The projection token by token: each channel's k x k neighbourhood (zero-padded, every
    ``stride``-th position) weighted by that channel's filter, batch norm in eval mode, linear map."""
    conv, norm = proj.conv, proj.norm
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    x = F.pad(x, (p, p, p, p))
    H, W = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
    filters = conv.weight[:, 0]  # (dim, k, k)
    tokens = []
    for i in range(H):
        for j in range(W):
            y = (x[:, :, i * s : i * s + k, j * s : j * s + k] * filters).sum((-1, -2))
            y = (y - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
            tokens.append(proj.linear(y))
    return torch.stack(tokens, 1)


@register_model(family="CvT")
def cvt13(**kwargs):
    return CvT(**{"depths": (1, 2, 10), **kwargs})


@register_model(family="CvT")
def cvt21(**kwargs):
    return CvT(**{"depths": (1, 4, 16), **kwargs})
