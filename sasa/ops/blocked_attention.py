"""Blocks of queries attending over blocks of keys, with a bias that factorises over the keys' two
axes: the op under the fast paths of the halo, neighbourhood and global-attention mixers.

q, k: (B, heads, d, P) and v: (B, heads, dv, P) are maps of P pixels (any strides). Each of
``blocks`` blocks is the same for every image and head: ``query_index`` (blocks, L) lists its
query pixels (-1: a padding query, no output), ``key_index`` (blocks, S) its key pixels, S = Sr x
Sc (a block of key rows by a block of key columns). The logit of query l of block n (of one
image and head, n counting (image, head, block) in that order) for key (a, x) is
q_l . k_(a,x) + row_bias[n, l, a] + col_bias[n, l, x], unscaled (callers scale q); a -inf bias masks
a key, and every query keeps at least one. Every pixel must be the query of one block at most.
Returns the (B, heads, dv, P) map of outputs (zeros where no query).

``pair_bias`` (optional; (heads, blocks, L, S), the same for every image) adds a logit per (query,
key) pair that does not factorise over the axes (NAT's learned relative bias): the C++ kernel does
not take it, so with it the op runs the SDPA formulation on every device.

Relative position logits and window masks are exactly such per-axis biases, so a mixer only
lists its blocks and computes two small bias tables; the fast path never builds the
(queries x keys) logits. ``reference_blocked_attention`` is the obviously-correct einsum version;
``blocked_attention`` is a custom op with the C++ kernel of ``csrc/blocked_attention_cpu.cpp`` on the
CPU (keys read through the index tables, logit rows in cache, only the log-sum-exp kept,
probabilities recomputed in the backward pass), and ``F.scaled_dot_product_attention`` on gathered
blocks with the bias as its mask elsewhere (the device's fused attention), or on the CPU without a
compiler or for other dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sasa.ops import cpu_extension


def _blocks(t, index):
    """(B, heads, C, P) map -> (B, heads, blocks, C, len) of the indexed pixels, zeros for -1."""
    g = t.index_select(3, index.clamp(min=0).flatten()).unflatten(3, index.shape)
    if (index < 0).any():
        g = g * (index >= 0)
    return g.transpose(2, 3)


def _to_map(blocks_out, query_index, P):
    """(B, heads, blocks, C, L) outputs -> (B, heads, C, P) map; padding queries are dropped."""
    B, heads, _, C, _ = blocks_out.shape
    keep = (query_index >= 0).flatten()
    values = blocks_out.transpose(2, 3).flatten(3)[..., keep]
    out = blocks_out.new_zeros(B, heads, C, P)
    return out.index_copy(3, query_index.flatten()[keep], values)


def _bias(row_bias, col_bias, B, heads, pair_bias=None):
    """(n, L, Sr), (n, L, Sc) and (heads, blocks, L, Sr * Sc) or None -> (B, heads, blocks, L, Sr * Sc)."""
    bias = (row_bias[..., :, None] + col_bias[..., None, :]).flatten(2)
    bias = bias.view(B, heads, -1, *bias.shape[1:])
    return bias if pair_bias is None else bias + pair_bias


def reference_blocked_attention(q, k, v, query_index, key_index, row_bias, col_bias, pair_bias=None):
    B, heads, _, P = q.shape
    logits = torch.einsum("zhncl,zhncs->zhnls", _blocks(q, query_index), _blocks(k, key_index))
    logits = logits + _bias(row_bias, col_bias, B, heads, pair_bias)
    out = torch.einsum("zhnls,zhncs->zhncl", logits.softmax(dim=-1), _blocks(v, key_index))
    return _to_map(out, query_index, P)


def _sdpa_blocked_attention(q, k, v, query_index, key_index, row_bias, col_bias, pair_bias=None):
    B, heads, _, P = q.shape
    qb, kb, vb = (_blocks(t, i).transpose(3, 4) for t, i in ((q, query_index), (k, key_index), (v, key_index)))
    out = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=_bias(row_bias, col_bias, B, heads, pair_bias), scale=1.0
    )
    return _to_map(out.transpose(3, 4), query_index, P)


def blocked_attention(q, k, v, query_index, key_index, row_bias, col_bias, pair_bias=None):
    """Same result as the reference (see the module docstring)."""
    if (
        pair_bias is None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and cpu_extension.load() is not None
    ):
        return blocked_attention_op(q, k, v, query_index, key_index, row_bias, col_bias)[0]
    return _sdpa_blocked_attention(q, k, v, query_index, key_index, row_bias, col_bias, pair_bias)


@torch.library.custom_op("sasa::blocked_attention", mutates_args=(), device_types="cpu")
def blocked_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    row_bias: torch.Tensor,
    col_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output map and the log-sum-exp (B * heads * blocks, L) of every query's softmax."""
    return cpu_extension.load().blocked_attention_forward(q, k, v, query_index, key_index, row_bias, col_bias)


@blocked_attention_op.register_fake
def _(q, k, v, query_index, key_index, row_bias, col_bias):
    return v.new_empty(v.shape), q.new_empty(row_bias.shape[:2])


@torch.library.custom_op("sasa::blocked_attention_backward", mutates_args=(), device_types="cpu")
def blocked_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    row_bias: torch.Tensor,
    col_bias: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v and both biases, from probabilities recomputed with the log-sum-exp."""
    return cpu_extension.load().blocked_attention_backward(
        grad_out, q, k, v, query_index, key_index, row_bias, col_bias, out, lse
    )


@blocked_attention_backward.register_fake
def _(grad_out, q, k, v, query_index, key_index, row_bias, col_bias, out, lse):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        row_bias.new_empty(row_bias.shape),
        col_bias.new_empty(col_bias.shape),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out, _grad_lse):
    dq, dk, dv, drow, dcol = blocked_attention_backward(grad_out, *ctx.saved_tensors)
    return dq, dk, dv, None, None, drow, dcol


blocked_attention_op.register_autograd(_backward, setup_context=_setup_context)

BLOCKED_ATTENTION_IMPLS = {"reference": reference_blocked_attention, "fast": blocked_attention}
