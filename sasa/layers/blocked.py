"""Fast paths of the halo, neighbourhood and global-attention mixers as one computation: blocks of
queries attend over blocks of keys (``sasa.ops.blocked_attention``).

Each mixer only says, per image axis, which keys a block of queries reads and how (``AxisBlocks``):
the key positions of each block, and for each query of the block and each of those keys the
relative-embedding index and whether the key is in the query's window (a -inf bias if not).
Because a 2-D window is the product of a row window and a column window, the mask and the relative
logits of a (query, key) pair are the sum of a row term and a column term, which is what the op
takes. The three mixers differ only in their axes:

- halo: b x b blocks, keys the block and h pixels around it; out-of-image keys masked;
- neighbourhood: b x b blocks, keys the union of the block's k x k windows (shifted inside the
  map, as the mixer's windows are), each query masked to its own window: exact, at the price of
  computing logits for the (b + k - 1)^2 keys of the union;
- global: one block, the whole map.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sasa.ops.blocked_attention import BLOCKED_ATTENTION_IMPLS


class AxisBlocks(NamedTuple):
    """One image axis cut into blocks of ``block`` queries.

    keys: (blocks, S) the key positions each block reads (clamped into the axis where masked);
    rel: (blocks, block, S) the relative-embedding index of (query i of the block, key);
    mask: (blocks, block, S) 0 where the query sees the key, -inf where not.
    """

    block: int
    keys: torch.Tensor
    rel: torch.Tensor
    mask: torch.Tensor

    @property
    def blocks(self):
        return self.keys.shape[0]


def _axis(n, block, starts, width, rel_offset, rel_size, dtype, window=None):
    """Blocks of ``block`` queries from ``starts`` (blocks,) with ``width`` keys each; ``window``
    maps query positions to the (first, last + 1) key they may see, beyond the axis' bounds."""
    keys = starts[:, None] + torch.arange(width, device=starts.device)  # (blocks, S)
    queries = torch.arange(starts.shape[0] * block, device=starts.device).view(-1, block, 1)  # (blocks, block, 1)
    keys3 = keys[:, None, :]
    seen = (keys3 >= 0) & (keys3 < n)
    if window is not None:
        first, end = window(queries)
        seen = seen & (keys3 >= first) & (keys3 < end)
    rel = (keys3 - queries + rel_offset).clamp(0, rel_size - 1)
    mask = torch.zeros(seen.shape, dtype=dtype, device=starts.device).masked_fill(~seen, float("-inf"))
    return AxisBlocks(block, keys.clamp(0, n - 1), rel, mask)


def halo_axis(n, block, halo, dtype, device=None):
    """HaloNet: each block reads itself and ``halo`` keys on either side; embedding index key -
    query + block + halo - 1 (2 (block + halo) - 1 embeddings)."""
    starts = torch.arange(-(-n // block), device=device) * block - halo
    return _axis(n, block, starts, block + 2 * halo, block + halo - 1, 2 * (block + halo) - 1, dtype)


def neighborhood_axis(n, kernel_size, block, dtype, device=None):
    """Neighbourhood attention: query y sees keys [s, s + k) with s = clamp(y - k // 2, 0, n - k);
    a block of queries reads the union of its windows; embedding index key - query + k - 1."""
    c = kernel_size // 2
    width = min(block + kernel_size - 1, n)
    starts = (torch.arange(-(-n // block), device=device) * block - c).clamp(0, n - width)

    def window(y):
        first = (y - c).clamp(0, n - kernel_size)
        return first, first + kernel_size

    return _axis(n, block, starts, width, kernel_size - 1, 2 * kernel_size - 1, dtype, window)


def window_axis(n, kernel_size, block, dtype, device=None):
    """SASA's windows: query y sees keys [y - k // 2, y + k // 2], those outside the axis masked; a
    block of queries reads the union of its windows (embedding index key - query + k - 1)."""
    c = kernel_size // 2
    starts = torch.arange(-(-n // block), device=device) * block - c

    def window(y):
        y = y.clamp(max=n - 1)  # padding queries past the axis read the last query's window: no row is all -inf
        return y - c, y + c + 1

    return _axis(n, block, starts, block + kernel_size - 1, kernel_size - 1, 2 * kernel_size - 1, dtype, window)


def global_axis(n, max_extent, dtype, device=None):
    """Global attention: one block of all n queries over all n keys; embedding index of the offset
    clipped to +-(max_extent - 1), plus max_extent - 1."""
    pos = torch.arange(n, device=device)
    rel = (pos[None, :] - pos[:, None]).clamp(-(max_extent - 1), max_extent - 1) + max_extent - 1
    return AxisBlocks(n, pos[None], rel[None], torch.zeros(1, n, n, dtype=dtype, device=device))


def query_blocks(t, rows, cols):
    """(B, heads, d, H, W) -> (B, heads, R, C, d, bh, bw): zero-padded to whole blocks."""
    B, heads, d, H, W = t.shape
    bh, bw = rows.block, cols.block
    t = F.pad(t, (0, cols.blocks * bw - W, 0, rows.blocks * bh - H))
    return t.view(B, heads, d, rows.blocks, bh, cols.blocks, bw).permute(0, 1, 3, 5, 2, 4, 6)


def index_tables(rows, cols, H, W):
    """(R * C, bh * bw) query pixels (-1 for padding) and (R * C, Sr * Sc) key pixels of every block."""
    device = rows.keys.device
    y = torch.arange(rows.blocks * rows.block, device=device).view(-1, 1, rows.block, 1)  # (R, 1, i, 1)
    x = torch.arange(cols.blocks * cols.block, device=device).view(1, -1, 1, cols.block)  # (1, C, 1, j)
    queries = torch.where((y < H) & (x < W), y * W + x, -1)
    keys = rows.keys[:, None, :, None] * W + cols.keys[None, :, None, :]  # (R, C, a, x)
    return queries.flatten(2).flatten(0, 1), keys.flatten(2).flatten(0, 1)


def pair_bias_table(bias, rows, cols):
    """(heads, Er, Ec) learned logits of each (row, column) offset -> (heads, R * C, bh * bw, Sr * Sc),
    the op's ``pair_bias``: entry [h, block, query, key] = bias[h, rows.rel, cols.rel] of the pair."""
    t = bias[
        :, rows.rel[:, None, :, None, :, None], cols.rel[None, :, None, :, None, :]
    ]  # (heads, R, C, bh, bw, Sr, Sc)
    return t.flatten(5).flatten(3, 4).flatten(1, 2)


def blocked_attention_2d(q, k, v, rows, cols, rel_row=None, rel_col=None, impl="fast", bias=None):
    """q, k: (B, heads, d, H, W); v: (B, heads, dv, H, W) -> (B, heads, dv, H, W).

    The logit of query (y, x) for key (a, b) is q . k + q_row . rel_row[rows.rel] + q_col .
    rel_col[cols.rel] with q_row, q_col the first and second halves of q's channels, or q . k alone
    without embeddings, plus ``bias[h, rows.rel, cols.rel]`` where a (heads, Er, Ec) table of learned
    offset logits is given; keys outside the query's window (per ``rows`` and ``cols``) are masked.
    ``impl``: the op's ``fast`` kernel or its ``reference``."""
    B, heads, d, H, W = q.shape
    R, C, bh, bw = rows.blocks, cols.blocks, rows.block, cols.block
    row_mask = rows.mask[:, None, :, None, :]  # (R, 1, bh, 1, Sr) over (R, C, i, j, a)
    col_mask = cols.mask[None, :, None, :, :]  # (1, C, 1, bw, Sc) over (R, C, i, j, x)
    if rel_row is not None:
        half = d // 2
        qb = query_blocks(q, rows, cols)  # (B, heads, R, C, d, bh, bw)
        row_bias = torch.einsum("zhrscij,hcria->zhrsija", qb[:, :, :, :, :half], rel_row[:, :, rows.rel]) + row_mask
        col_bias = torch.einsum("zhrscij,hcsjx->zhrsijx", qb[:, :, :, :, half:], rel_col[:, :, cols.rel]) + col_mask
    else:
        row_bias = row_mask.expand(B, heads, R, C, bh, bw, -1)
        col_bias = col_mask.expand(B, heads, R, C, bh, bw, -1)
    n, L = B * heads * R * C, bh * bw
    queries, keys = index_tables(rows, cols, H, W)
    pair = None if bias is None else pair_bias_table(bias, rows, cols)
    out = BLOCKED_ATTENTION_IMPLS[impl](
        q.flatten(3),
        k.flatten(3),
        v.flatten(3),
        queries,
        keys,
        row_bias.reshape(n, L, -1),
        col_bias.reshape(n, L, -1),
        pair,
    )
    return out.unflatten(3, (H, W))


def blocked_mixer_attention(layer, x, axis):
    """The fast path of a windowed mixer (``qkv``, ``heads``, ``head_dim``, ``rel_row``, ``rel_col``,
    optionally ``rel_bias``): (B, in, H, W) -> (B, out, H, W), with ``axis(n)`` the blocks of an image
    axis of length n."""
    B, _, H, W = x.shape
    q, k, v = layer.qkv(x).view(B, 3, layer.heads, layer.head_dim, H, W).unbind(1)
    bias = getattr(layer, "rel_bias", None)
    return blocked_attention_2d(q, k, v, axis(H), axis(W), layer.rel_row, layer.rel_col, bias=bias).reshape(B, -1, H, W)
