"""Local self-attention over the k x k window of every pixel: a reference and a fast kernel.

Both take q, k, v of shape (B, heads, d, H, W) and return (B, heads, d, H, W). The logit of
query pixel (i, j) for memory pixel (a, b) is q_ij . k_ab + q_ij . r_(a-i, b-j) with
r = [row embedding (d/2), column embedding (d/2)] (``rel_row``, ``rel_col``: (heads, d/2, k)).
Window positions outside the image are masked: they take no softmax weight, so a border pixel
attends over the part of its window that lies in the image (the paper leaves borders open;
zero-padded keys would still soak up probability mass).

``reference_local_attention`` is the obviously-correct unfold formulation: it materialises every
window, O(k^2 C H W) memory. ``fast_local_attention`` keeps only the output and one log-sum-exp
per pixel and head and recomputes the probabilities in its backward pass (as FlashAttention
does): activation memory independent of k. It is one custom op with two kernels: on the CPU the
C++ kernel of ``csrc/local_attention_cpu.cpp`` (one image row at a time, see there), elsewhere (and
on the CPU without a compiler, or for dtypes other than float32/float64) a PyTorch loop over the
k^2 offsets with an online softmax. On CUDA the fast path is FlexAttention with a neighbourhood
block mask instead (``flex_local_attention.py``), except while FLOPs are counted: the counter would
score FlexAttention as dense attention over every pixel, so the op, with its exact formula, runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from sasa.counting import counting_flops
from sasa.ops import cpu_extension
from sasa.ops.flex_local_attention import flex_local_attention

FLEX_DEVICES = ("cuda",)  # where the fast path is FlexAttention


def reference_local_attention(q, k, v, kernel_size, rel_row=None, rel_col=None):
    """Unfold every k x k window and take a masked softmax over it (the paper's formula)."""
    B, heads, d, H, W = q.shape
    kk = kernel_size * kernel_size

    def windows(t):  # (B, heads, d, H, W) -> (B, heads, d, k*k, H, W), zeros outside the image
        cols = F.unfold(t.reshape(B, heads * d, H, W), kernel_size, padding=kernel_size // 2)
        return cols.view(B, heads, d, kk, H, W)

    inside = F.unfold(q.new_ones(1, 1, H, W), kernel_size, padding=kernel_size // 2)
    inside = inside.view(1, 1, kk, H, W) > 0
    logits = (q.unsqueeze(3) * windows(k)).sum(2)  # (B, heads, k*k, H, W)
    if rel_row is not None:
        half = rel_row.shape[1]
        r = torch.cat(  # r[:, :, di, dj] = [rel_row[:, :, di], rel_col[:, :, dj]]
            [
                rel_row[:, :, :, None].expand(heads, half, kernel_size, kernel_size),
                rel_col[:, :, None, :].expand(heads, half, kernel_size, kernel_size),
            ],
            dim=1,
        )
        logits = logits + torch.einsum("bhdyx,hdn->bhnyx", q, r.flatten(2))
    attn = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)
    return (attn.unsqueeze(2) * windows(v)).sum(3)


def fast_local_attention(q, k, v, kernel_size, rel_row=None, rel_col=None):
    """Same result as the reference without its k^2 memory (see the module docstring); on CUDA,
    FlexAttention (``sasa.ops.flex_local_attention``).

    The relative term is factorised, q.r = q_row . rel_row[di] + q_col . rel_col[dj], so it costs
    k d per pixel instead of k^2 d: two (B, heads, k, H, W) logit tables, which the C++ kernel
    computes row by row instead of storing.
    """
    if q.device.type in FLEX_DEVICES and not counting_flops():
        return flex_local_attention(q, k, v, *_logit_tables(q, rel_row, rel_col), kernel_size)
    out, _ = local_attention(q, k, v, rel_row, rel_col, kernel_size)
    return out


def _logit_tables(q, rel_row, rel_col):
    """(B, heads, k, H, W) row and column relative logits, or (None, None)."""
    if rel_row is None:
        return None, None
    half = rel_row.shape[1]
    return torch.einsum("bhcyx,hck->bhkyx", q[:, :, :half], rel_row), torch.einsum(
        "bhcyx,hck->bhkyx", q[:, :, half:], rel_col
    )


# --- the fast kernel as a custom op: opaque to autograd (own backward), to FlopCounterMode (own
# --- formula) and to torch.compile (fake implementation below).


def _offsets(kernel_size):
    """Window offsets, the centre first: it is always inside the image, so the running max of
    the online softmax is finite from the first step and masked offsets contribute exp(-inf) = 0."""
    c = kernel_size // 2
    rest = [(i, j) for i in range(kernel_size) for j in range(kernel_size) if (i, j) != (c, c)]
    return [(c, c)] + rest


def _border_masks(kernel_size, H, W, like):
    """Additive masks (k, H, 1) and (k, 1, W): 0 where offset di (dj) stays inside, -inf outside."""
    c = kernel_size // 2
    offs = torch.arange(kernel_size, device=like.device)[:, None] - c

    def mask(n):
        pos = torch.arange(n, device=like.device)[None, :] + offs
        inside = (pos >= 0) & (pos < n)
        return torch.zeros(inside.shape, dtype=like.dtype, device=like.device).masked_fill(~inside, float("-inf"))

    return mask(H)[:, :, None], mask(W)[:, None, :]


class _Windows:
    """Zero-padded copies of k and v whose shifted views are the memory pixels of one offset."""

    def __init__(self, q, k, v, rel_row, rel_col, kernel_size):
        self.H, self.W = q.shape[-2:]
        c = kernel_size // 2
        self.k = F.pad(k, (c, c, c, c))
        self.v = F.pad(v, (c, c, c, c))
        self.q = q
        self.row, self.col = _logit_tables(q, rel_row, rel_col)
        if self.row is None:
            self.row = self.col = q.new_zeros(1, 1, kernel_size, 1, 1)
        self.row_mask, self.col_mask = _border_masks(kernel_size, self.H, self.W, q)

    def window(self, t, di, dj):
        return t[..., di : di + self.H, dj : dj + self.W]

    def logits(self, di, dj):
        s = (self.q * self.window(self.k, di, dj)).sum(2)
        return s + self.row[:, :, di] + self.col[:, :, dj] + self.row_mask[di] + self.col_mask[dj]


@torch.library.custom_op("sasa::local_attention", mutates_args=())
def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the attention output and the log-sum-exp of every (pixel, head) softmax."""
    return _offsets_forward(q, k, v, rel_row, rel_col, kernel_size)


def _cpu_extension(dtype):
    return cpu_extension.load() if dtype in (torch.float32, torch.float64) else None


@local_attention.register_kernel("cpu")
def _(q, k, v, rel_row, rel_col, kernel_size):
    ext = _cpu_extension(q.dtype)
    if ext is None:
        return _offsets_forward(q, k, v, rel_row, rel_col, kernel_size)
    return ext.local_attention_forward(q, k, v, rel_row, rel_col, kernel_size)


def _offsets_forward(q, k, v, rel_row, rel_col, kernel_size):
    """The PyTorch kernel: one offset at a time, online softmax."""
    w = _Windows(q, k, v, rel_row, rel_col, kernel_size)
    for n, (di, dj) in enumerate(_offsets(kernel_size)):
        s = w.logits(di, dj)
        vw = w.window(w.v, di, dj)
        if n == 0:
            m, total, acc = s, torch.ones_like(s), vw.clone()
            continue
        m_new = torch.maximum(m, s)
        rescale, p = torch.exp(m - m_new), torch.exp(s - m_new)
        total = total * rescale + p
        acc = acc.mul_(rescale.unsqueeze(2)).addcmul_(p.unsqueeze(2), vw)
        m = m_new
    return (acc / total.unsqueeze(2)).contiguous(), (m + total.log()).contiguous()


# Every kernel returns contiguous tensors, and the fake implementations say so: torch.compile
# checks the real strides against them.
@local_attention.register_fake
def _(q, k, v, rel_row, rel_col, kernel_size):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2] + q.shape[3:])


@torch.library.custom_op("sasa::local_attention_backward", mutates_args=())
def local_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recomputes each offset's probabilities from the saved log-sum-exp (no k^2 storage).
    Without relative embeddings their two gradients are empty tensors."""
    return _offsets_backward(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size)


@local_attention_backward.register_kernel("cpu")
def _(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size):
    ext = _cpu_extension(q.dtype)
    if ext is None:
        return _offsets_backward(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size)
    return ext.local_attention_backward(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size)


def _offsets_backward(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size):
    w = _Windows(q, k, v, rel_row, rel_col, kernel_size)
    delta = (grad_out * out).sum(2)  # sum_s p_s (dout . v_s)
    B, heads, _, H, W = q.shape
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(w.k), torch.zeros_like(w.v)
    drow = q.new_zeros(B, heads, kernel_size, H, W)
    dcol = q.new_zeros(B, heads, kernel_size, H, W)
    for di, dj in _offsets(kernel_size):
        p = torch.exp(w.logits(di, dj) - lse)
        w.window(dv, di, dj).addcmul_(p.unsqueeze(2), grad_out)
        ds = p * ((grad_out * w.window(w.v, di, dj)).sum(2) - delta)
        dq.addcmul_(ds.unsqueeze(2), w.window(w.k, di, dj))
        w.window(dk, di, dj).addcmul_(ds.unsqueeze(2), q)
        drow[:, :, di] += ds
        dcol[:, :, dj] += ds
    c = kernel_size // 2
    drel_row, drel_col = q.new_empty(0), q.new_empty(0)
    if rel_row is not None:  # through the logit tables to q's halves and the embeddings
        half = rel_row.shape[1]
        dq[:, :, :half] += torch.einsum("bhkyx,hck->bhcyx", drow, rel_row)
        dq[:, :, half:] += torch.einsum("bhkyx,hck->bhcyx", dcol, rel_col)
        drel_row = torch.einsum("bhkyx,bhcyx->hck", drow, q[:, :, :half])
        drel_col = torch.einsum("bhkyx,bhcyx->hck", dcol, q[:, :, half:])
    return (
        dq.contiguous(),
        dk[..., c : c + H, c : c + W].contiguous(),
        dv[..., c : c + H, c : c + W].contiguous(),
        drel_row.contiguous(),
        drel_col.contiguous(),
    )


@local_attention_backward.register_fake
def _(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size):
    rel = (
        [q.new_empty(0), q.new_empty(0)]
        if rel_row is None
        else [rel_row.new_empty(rel_row.shape), rel_col.new_empty(rel_col.shape)]
    )
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), *rel


def _setup_context(ctx, inputs, output):
    q, k, v, rel_row, rel_col, kernel_size = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_row, rel_col, out, lse)
    ctx.kernel_size, ctx.relative = kernel_size, rel_row is not None


def _backward(ctx, grad_out, _grad_lse):
    dq, dk, dv, drel_row, drel_col = local_attention_backward(grad_out, *ctx.saved_tensors, ctx.kernel_size)
    if not ctx.relative:
        drel_row = drel_col = None
    return dq, dk, dv, drel_row, drel_col, None


local_attention.register_autograd(_backward, setup_context=_setup_context)


def _macs_per_window_entry(q_shape, kernel_size):
    """k^2 d multiply-adds per pixel and head: one pass over every window entry."""
    B, heads, d, H, W = q_shape
    return B * heads * H * W * kernel_size * kernel_size * d


def _relative_macs(q_shape, kernel_size):
    """The factorised relative tables: k (d/2) multiply-adds each, per pixel and head."""
    B, heads, d, H, W = q_shape
    return B * heads * H * W * kernel_size * d


@register_flop_formula(torch.ops.sasa.local_attention)
def _local_attention_flops(q_shape, k_shape, v_shape, row_shape, col_shape, kernel_size, *args, **kwargs):
    """q.k logits and the softmax-weighted sum of values, plus the relative tables."""
    relative = _relative_macs(q_shape, kernel_size) if row_shape is not None else 0
    return 2 * (2 * _macs_per_window_entry(q_shape, kernel_size) + relative)


@register_flop_formula(torch.ops.sasa.local_attention_backward)
def _local_attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, row_shape, *args, **kwargs):
    """Recomputed logits, dv, dp, dq and dk; for the relative tables: recomputed, dq, embeddings."""
    kernel_size = args[-1]
    relative = 3 * _relative_macs(q_shape, kernel_size) if row_shape is not None else 0
    return 2 * (5 * _macs_per_window_entry(q_shape, kernel_size) + relative)


LOCAL_ATTENTION_IMPLS = {"reference": reference_local_attention, "fast": fast_local_attention}
