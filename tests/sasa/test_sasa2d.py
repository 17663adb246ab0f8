"""Properties of the SASA layer the paper relies on."""

import math

import pytest
import torch

from sasa import SASA2d

D = torch.float64


def _layer(**kw):
    torch.manual_seed(0)
    args = dict(in_channels=6, out_channels=8, kernel_size=5, heads=2)
    args.update(kw)
    return SASA2d(**args).double()


@pytest.mark.parametrize("pos_enc", ["relative", "absolute", "none"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("H,W", [(7, 9), (1, 5), (6, 6)])
def test_implementations_agree(pos_enc, stride, H, W):
    layer = _layer(pos_enc=pos_enc, stride=stride)
    x = torch.randn(1, 6, H, W, dtype=D, requires_grad=True)
    outs, grads = [], []
    for impl in ("reference", "fast"):
        layer.impl = impl
        out = layer(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *layer.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("H,W", [(7, 9), (8, 8), (1, 1)])
def test_stride_two_matches_padded_conv_output_size(H, W):
    x = torch.randn(2, 6, H, W, dtype=D)
    conv = torch.nn.Conv2d(6, 8, 3, 2, 1).double()
    assert _layer(stride=2)(x).shape == conv(x).shape


@pytest.mark.parametrize("k", [1, 3, 7])
def test_receptive_field_is_exactly_the_k_by_k_window(k):
    layer = _layer(kernel_size=k)
    x = torch.randn(1, 6, 13, 13, dtype=D, requires_grad=True)
    i, j = 6, 5
    layer(x)[0, :, i, j].sum().backward()
    reached = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(13, 13, dtype=torch.bool)
    expected[i - k // 2 : i + k // 2 + 1, j - k // 2 : j + k // 2 + 1] = True
    assert torch.equal(reached, expected)


@pytest.mark.parametrize("pos_enc", ["relative", "none"])
def test_translation_equivariant_away_from_borders(pos_enc):
    layer, k = _layer(pos_enc=pos_enc), 5
    x = torch.randn(1, 6, 20, 20, dtype=D)
    dy, dx = 2, 3
    shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    out, out_shifted = layer(x), layer(shifted)
    m = k // 2 + max(dy, dx)  # pixels whose windows never touch a border or the wrapped-around seam
    torch.testing.assert_close(
        out_shifted[..., m + dy : 20 - m + dy, m + dx : 20 - m + dx], out[..., m : 20 - m, m : 20 - m]
    )


def test_absolute_encoding_breaks_translation_equivariance():
    layer = _layer(pos_enc="absolute")
    x = torch.randn(1, 6, 20, 20, dtype=D)
    out, out_shifted = layer(x), layer(torch.roll(x, shifts=(2, 3), dims=(2, 3)))
    assert not torch.allclose(out_shifted[..., 7:13, 8:14], out[..., 5:11, 5:11])


def _sinusoid(n, pos):
    """n channels encoding one coordinate: ceil(n/2) sines, then cosines, of pos / 10000^(2i/n)."""
    sines = (n + 1) // 2
    return [
        math.sin(pos / 10000 ** (2 * c / n)) if c < sines else math.cos(pos / 10000 ** (2 * (c - sines) / n))
        for c in range(n)
    ]


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_absolute_encoding_matches_explicit_formula_forward_and_backward(impl):
    """The paper only names an absolute encoding; ours adds a fixed sinusoid of the key pixel's
    position to every head's keys, half of a head's channels for the row, half for the column:
    logit(ij, ab) = q_ij . (k_ab + [s(a), s(b)]), softmax over the in-image window. Head width 6,
    so each axis has two sines and one cosine."""
    layer = _layer(out_channels=12, pos_enc="absolute", impl=impl)
    heads, hd, H, W, c = 2, 6, 5, 6, 2
    x = torch.randn(1, 6, H, W, dtype=D, requires_grad=True)
    q, k, v = torch.einsum("oc,cyx->oyx", layer.qkv.weight[:, :, 0, 0], x[0]).view(3, heads, hd, H, W)
    pixels = []
    for h in range(heads):
        for i in range(H):
            for j in range(W):
                window = [
                    (a, b)
                    for a in range(i - c, i + c + 1)
                    for b in range(j - c, j + c + 1)
                    if 0 <= a < H and 0 <= b < W
                ]
                logits = torch.stack(
                    [
                        q[h, :, i, j]
                        @ (k[h, :, a, b] + torch.tensor(_sinusoid(hd // 2, a) + _sinusoid(hd // 2, b), dtype=D))
                        for a, b in window
                    ]
                )
                pixels.append(logits.softmax(0) @ torch.stack([v[h, :, a, b] for a, b in window]))
    expected = torch.stack(pixels).view(heads, H, W, hd).permute(0, 3, 1, 2).reshape(1, heads * hd, H, W)
    out = layer(x)
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(out)
    leaves = [x, layer.qkv.weight]
    for g, g_expected in zip(
        torch.autograd.grad((out * weights).sum(), leaves), torch.autograd.grad((expected * weights).sum(), leaves)
    ):
        torch.testing.assert_close(g, g_expected)


def test_parameters_grow_with_k_only_through_relative_embeddings():
    def n(k, pos_enc="relative"):
        return sum(p.numel() for p in SASA2d(64, 128, kernel_size=k, heads=8, pos_enc=pos_enc).parameters())

    assert n(3) == 3 * 64 * 128 + 3 * 128  # qkv projections + one d_out-wide vector per row and column offset
    assert [n(k) - n(3) for k in (5, 7, 9, 11)] == [(k - 3) * 128 for k in (5, 7, 9, 11)]
    assert {n(k, "none") for k in (3, 7, 11)} == {3 * 64 * 128}


def test_softmax_is_per_head_not_per_channel():
    """The known-wrong reproduction normalises each channel separately; per head, every channel of
    a head shares one set of attention weights, so equal value channels give equal outputs."""
    layer = _layer(pos_enc="none")
    x = torch.randn(1, 6, 7, 7, dtype=D)
    with torch.no_grad():
        w = layer.qkv.weight.view(3, 2, 4, 6, 1, 1)
        w[2, :, 1:] = w[2, :, :1]  # every value channel of a head is the same projection
    out = layer(x).view(1, 2, 4, 7, 7)
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))


BAD = [
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=-3), "kernel_size"),
    (dict(out_channels=12, heads=8), "out_channels"),
    (dict(out_channels=8, heads=8, pos_enc="relative"), "out_channels"),  # head dim 1 cannot split in halves
    (dict(pos_enc="learned"), "pos_enc"),
    (dict(stride=3), "stride"),
    (dict(heads=0), "heads"),
    (dict(impl="cuda"), "impl"),
]


@pytest.mark.parametrize("kwargs,name", BAD)
def test_bad_arguments_name_the_argument(kwargs, name):
    args = dict(in_channels=8, out_channels=16, kernel_size=3, heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        SASA2d(**args)


@pytest.mark.parametrize("H,W", [(7, 9), (8, 8), (1, 1), (6, 5)])
def test_ceil_average_pool_equals_torch_ceil_mode_forward_and_backward(H, W):
    from sasa.layers.sasa2d import CeilAvgPool2d

    x = torch.randn(2, 3, H, W, dtype=torch.float64, requires_grad=True)
    ours, torchs = CeilAvgPool2d()(x), torch.nn.AvgPool2d(2, 2, ceil_mode=True)(x)
    torch.testing.assert_close(ours, torchs)
    w = torch.randn_like(ours)
    torch.testing.assert_close(
        torch.autograd.grad((ours * w).sum(), x)[0], torch.autograd.grad((torchs * w).sum(), x)[0]
    )
