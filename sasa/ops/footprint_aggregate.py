"""The weighted sum over each pixel's k x k footprint of SAN's vector attention and ELSA's filters.

attn: (B, G, k*k, H, W) weights (footprint position n = di * k + dj, zeros outside the image);
values: (B, C, H, W) with C = G * share, weight channel g serving value channels g*share ...
g*share + share - 1; scale and bias: None or (C, k*k), a learned factor and addend of each channel and
position (ELSA's ghost head). out[c = g*share + s, y, x] = sum_n (attn[g, n, y, x] scale[c, n] + bias[c, n])
values[c, y + di - k//2, x + dj - k//2], zeros outside the image.

``reference_footprint_aggregate`` unfolds the values (a k^2-times copy: 157 MiB for 8 x 128 x 28 x 28
at k = 7) and takes an einsum; ``footprint_aggregate`` is one custom op whose CPU kernel
(``csrc/footprint_aggregate_cpu.cpp``) reads shifted rows of one padded copy instead; elsewhere, or
without a compiler, it runs the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sasa.ops import cpu_extension


def reference_footprint_aggregate(attn, values, kernel_size, scale=None, bias=None):
    B, G, kk, H, W = attn.shape
    cols = F.unfold(values, kernel_size, padding=kernel_size // 2).view(B, G, -1, kk, H, W)
    weights = attn[:, :, None]  # (B, G, 1 or share, k*k, H, W): every channel's filter
    if scale is not None:
        weights = weights * scale.view(1, G, -1, kk, 1, 1)
    if bias is not None:
        weights = weights + bias.view(1, G, -1, kk, 1, 1)
    return torch.einsum("bgsnyx,bgsnyx->bgsyx", weights.expand_as(cols), cols).reshape(values.shape)


def _extension(t):
    return cpu_extension.load() if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) else None


def footprint_aggregate(attn, values, kernel_size, scale=None, bias=None):
    if _extension(values) is None:
        return reference_footprint_aggregate(attn, values, kernel_size, scale, bias)
    # the op's schema has no optional tensors: an empty scale means ones, an empty bias zeros
    scale, bias = (values.new_empty(0) if t is None else t for t in (scale, bias))
    return footprint_aggregate_op(attn, values, scale, bias, kernel_size)


@torch.library.custom_op("sasa::footprint_aggregate", mutates_args=(), device_types="cpu")
def footprint_aggregate_op(
    attn: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    return _extension(values).footprint_aggregate_forward(attn, values, scale, bias, kernel_size)


@footprint_aggregate_op.register_fake
def _(attn, values, scale, bias, kernel_size):
    return values.new_empty(values.shape)


@torch.library.custom_op("sasa::footprint_aggregate_backward", mutates_args=(), device_types="cpu")
def footprint_aggregate_backward(
    grad_out: torch.Tensor,
    attn: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _extension(values).footprint_aggregate_backward(grad_out, attn, values, scale, bias, kernel_size)


@footprint_aggregate_backward.register_fake
def _(grad_out, attn, values, scale, bias, kernel_size):
    return (
        attn.new_empty(attn.shape),
        values.new_empty(values.shape),
        scale.new_empty(scale.shape),
        bias.new_empty(bias.shape),
    )


def _setup_context(ctx, inputs, output):
    attn, values, scale, bias, kernel_size = inputs
    ctx.save_for_backward(attn, values, scale, bias)
    ctx.kernel_size = kernel_size


def _backward(ctx, grad_out):
    grad_attn, grad_values, grad_scale, grad_bias = footprint_aggregate_backward(
        grad_out, *ctx.saved_tensors, ctx.kernel_size
    )
    return (
        grad_attn,
        grad_values,
        grad_scale if grad_scale.numel() else None,
        grad_bias if grad_bias.numel() else None,
        None,
    )


footprint_aggregate_op.register_autograd(_backward, setup_context=_setup_context)

FOOTPRINT_AGGREGATE_IMPLS = {"reference": reference_footprint_aggregate, "fast": footprint_aggregate}
