"""The attention stem computes the paper's spatially-aware-value attention within 4x4 tiles."""
import pytest
import torch

from sasa.layers import SpatiallyAwareAttention, attention_stem, conv_stem

D = torch.float64


def _explicit(layer, x):
    """Per-pixel loop: attend over the in-image pixels of one's own tile, values mixed by position."""
    B, _, H, W = x.shape
    b, heads, hd, m = layer.block_size, layer.heads, layer.head_dim, layer.mixtures
    C = layer.out_channels
    qk = torch.einsum("oc,bchw->bohw", layer.qk.weight[:, :, 0, 0], x)
    vals = torch.einsum("oc,bchw->bohw", layer.values.weight[:, :, 0, 0], x).view(B, m, C, H, W)
    out = torch.zeros(B, C, H, W, dtype=x.dtype)
    for i in range(H):
        for j in range(W):
            keys = [(a, c) for a in range(i - i % b, i - i % b + b) for c in range(j - j % b, j - j % b + b) if a < H and c < W]
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                q = qk[0, sl, i, j]
                logits, values = [], []
                for a, c in keys:
                    r = torch.cat([layer.rel_row[h, :, a % b - i % b + b - 1], layer.rel_col[h, :, c % b - j % b + b - 1]])
                    logits.append(q @ (qk[0, C + h * hd : C + (h + 1) * hd, a, c] + r))
                    p = ((layer.emb_row[a % b] + layer.emb_col[c % b]) @ layer.mixture_logits.t()).softmax(0)
                    values.append((p[:, None] * vals[0, :, sl, a, c]).sum(0))
                out[0, sl, i, j] = torch.stack(logits).softmax(0) @ torch.stack(values)
    return out


@pytest.mark.parametrize("H,W", [(8, 8), (5, 6), (2, 3)])
def test_stem_attention_matches_explicit_formula(H, W):
    torch.manual_seed(0)
    layer = SpatiallyAwareAttention(3, 8, block_size=4, heads=2, mixtures=4).double()
    x = torch.randn(1, 3, H, W, dtype=D)
    torch.testing.assert_close(layer(x), _explicit(layer, x))


def test_stem_attention_sees_only_its_tile():
    layer = SpatiallyAwareAttention(3, 8, heads=2).double()
    x = torch.randn(1, 3, 12, 12, dtype=D, requires_grad=True)
    layer(x)[0, :, 5, 6].sum().backward()
    reached = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[4:8, 4:8] = True
    assert torch.equal(reached, expected)


@pytest.mark.parametrize("make", [conv_stem, attention_stem])
@pytest.mark.parametrize("small_input,size,expected", [(False, 224, 56), (False, 30, 8), (True, 28, 28)])
def test_stems_downsample_by_4_or_1(make, small_input, size, expected):
    stem = make(3, 16, small_input=small_input, heads=2)
    assert stem(torch.randn(1, 3, size, size)).shape == (1, 16, expected, expected)


@pytest.mark.parametrize("kwargs,name", [(dict(mixtures=0), "mixtures"), (dict(out_channels=10, heads=4), "out_channels"), (dict(pos_enc="absolute"), "pos_enc")])
def test_stem_bad_arguments(kwargs, name):
    args = dict(in_channels=3, out_channels=16, heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        SpatiallyAwareAttention(**args)
