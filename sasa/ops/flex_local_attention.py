"""GPU kernel of local attention: FlexAttention over the image's pixels as tokens.

Every pixel is a query token attending over all pixel tokens, restricted by a block mask to its
k x k window (``create_block_mask`` skips the key blocks no query of a block can see, so the cost
is that of the window's rows, not of the image); the relative logits enter as a ``score_mod`` that
looks up the factorised row and column tables, so they get gradients like any captured tensor.
``torch.compile`` turns this into one fused Triton kernel for the forward and one for the backward
pass, safe under bf16/fp16 autocast. Triton's matrix units need head dimensions of at least 16:
smaller heads are zero-padded (zeros change no logit and produce zero output channels).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MIN_HEAD_DIM = 16


def _flex():
    """torch's FlexAttention module, imported on first use: only GPUs run this path, and the import
    would add about 0.5 s to every ``import sasa``."""
    from torch.nn.attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex_attention():
    return torch.compile(_flex().flex_attention, dynamic=False)


def _window(H, W, kernel_size):
    c = kernel_size // 2

    def inside(b, h, q_idx, kv_idx):
        return ((q_idx // W - kv_idx // W).abs() <= c) & ((q_idx % W - kv_idx % W).abs() <= c)

    return inside


@functools.lru_cache(maxsize=64)
def _block_mask(H, W, kernel_size, device):
    return _flex().create_block_mask(
        _window(H, W, kernel_size), B=None, H=None, Q_LEN=H * W, KV_LEN=H * W, device=device
    )


def _relative(row_logits, col_logits, W, kernel_size):
    """score_mod adding the row and column relative logits of the (query, key) offset."""
    rows, cols = row_logits.flatten(3), col_logits.flatten(3)  # (B, heads, k, H*W)
    c = kernel_size // 2

    def score_mod(score, b, h, q_idx, kv_idx):
        # clamped: the mod also runs on the masked-out positions of partially visible blocks
        di = (kv_idx // W - q_idx // W + c).clamp(0, kernel_size - 1)
        dj = (kv_idx % W - q_idx % W + c).clamp(0, kernel_size - 1)
        return score + rows[b, h, di, q_idx] + cols[b, h, dj, q_idx]

    return score_mod


def flex_local_attention(q, k, v, row_logits, col_logits, kernel_size, compiled=True):
    """(B, heads, d, H, W) q, k, v and (B, heads, k, H, W) row/column logit tables (or None for no
    relative term) -> (B, heads, d, H, W). ``compiled=False`` runs FlexAttention eagerly (the
    unfused math path: slow, O((HW)^2) memory; for tests on machines without a GPU)."""
    B, heads, d, H, W = q.shape
    pad = max(0, MIN_HEAD_DIM - d)

    def tokens(t):  # (B, heads, d, H, W) -> (B, heads, H*W, d + pad)
        return F.pad(t.flatten(3).transpose(2, 3), (0, pad))

    score_mod = None if row_logits is None else _relative(row_logits, col_logits, W, kernel_size)
    if compiled:
        attend, block_mask = _compiled_flex_attention(), _block_mask(H, W, kernel_size, str(q.device))
    else:
        flex = _flex()
        attend, block_mask = (
            flex.flex_attention,
            flex.create_block_mask(_window(H, W, kernel_size), None, None, H * W, H * W, device=q.device),
        )
    out = attend(tokens(q), tokens(k), tokens(v), score_mod=score_mod, block_mask=block_mask, scale=1.0)
    return out[..., :d].transpose(2, 3).reshape(B, heads, d, H, W)
