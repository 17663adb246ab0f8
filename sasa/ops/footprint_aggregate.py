"""The weighted sum of SAN's vector attention over each pixel's k x k footprint.

attn: (B, G, k*k, H, W) weights (footprint position n = di * k + dj, zeros outside the image);
values: (B, C, H, W) with C = G * share, weight channel g serving value channels g*share ...
g*share + share - 1. out[g*share + s, y, x] = sum_n attn[g, n, y, x] values[g*share + s, y + di - k//2,
x + dj - k//2], zeros outside the image.

``reference_footprint_aggregate`` unfolds the values (a k^2-times copy: 157 MiB for 8 x 128 x 28 x 28
at k = 7) and takes an einsum; ``footprint_aggregate`` is one custom op whose CPU kernel
(``csrc/footprint_aggregate_cpu.cpp``) reads shifted rows of one padded copy instead; elsewhere, or
without a compiler, it runs the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sasa.ops import cpu_extension


def reference_footprint_aggregate(attn, values, kernel_size):
    B, G, kk, H, W = attn.shape
    cols = F.unfold(values, kernel_size, padding=kernel_size // 2).view(B, G, -1, kk, H, W)
    return torch.einsum("bgnyx,bgsnyx->bgsyx", attn, cols).reshape(values.shape)


def _extension(t):
    return cpu_extension.load() if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) else None


def footprint_aggregate(attn, values, kernel_size):
    if _extension(values) is None:
        return reference_footprint_aggregate(attn, values, kernel_size)
    return footprint_aggregate_op(attn, values, kernel_size)


@torch.library.custom_op("sasa::footprint_aggregate", mutates_args=(), device_types="cpu")
def footprint_aggregate_op(attn: torch.Tensor, values: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _extension(values).footprint_aggregate_forward(attn, values, kernel_size)


@footprint_aggregate_op.register_fake
def _(attn, values, kernel_size):
    return values.new_empty(values.shape)


@torch.library.custom_op("sasa::footprint_aggregate_backward", mutates_args=(), device_types="cpu")
def footprint_aggregate_backward(grad_out: torch.Tensor, attn: torch.Tensor, values: torch.Tensor, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _extension(values).footprint_aggregate_backward(grad_out, attn, values, kernel_size)


@footprint_aggregate_backward.register_fake
def _(grad_out, attn, values, kernel_size):
    return attn.new_empty(attn.shape), values.new_empty(values.shape)


def _setup_context(ctx, inputs, output):
    attn, values, kernel_size = inputs
    ctx.save_for_backward(attn, values)
    ctx.kernel_size = kernel_size


def _backward(ctx, grad_out):
    return (*footprint_aggregate_backward(grad_out, *ctx.saved_tensors, ctx.kernel_size), None)


footprint_aggregate_op.register_autograd(_backward, setup_context=_setup_context)

FOOTPRINT_AGGREGATE_IMPLS = {"reference": reference_footprint_aggregate, "fast": footprint_aggregate}
