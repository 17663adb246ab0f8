"""Global relative attention and the two mixers built on it: BoTNet MHSA, attention-augmented conv."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sasa.layers.global_attention import AttentionAugmentedConv2d, BoTAttention2d, relative_global_attention

D = torch.float64


def _qkv(B=2, heads=2, dk=4, dv=3, H=4, W=5):
    torch.manual_seed(0)
    return [torch.randn(B, heads, d, H, W, dtype=D, requires_grad=True) for d in (dk, dk, dv)]


def _tokens(t):  # (B, heads, d, H, W) -> (B, heads, H*W, d)
    return t.flatten(3).transpose(-1, -2)


@pytest.mark.parametrize("embeddings", ["zeros", "none"])
def test_without_position_logits_equals_standard_multi_head_attention(embeddings):
    q, k, v = _qkv()
    rel = [torch.zeros(2, 2, 5, dtype=D) for _ in range(2)] if embeddings == "zeros" else [None, None]
    ours = relative_global_attention(q, k, v, *rel)
    sdpa = F.scaled_dot_product_attention(_tokens(q), _tokens(k), _tokens(v))  # scales by dk**-0.5 too
    torch.testing.assert_close(_tokens(ours), sdpa)
    w = torch.randn_like(sdpa)
    for a, b in zip(
        torch.autograd.grad((_tokens(ours) * w).sum(), (q, k, v)), torch.autograd.grad((sdpa * w).sum(), (q, k, v))
    ):
        torch.testing.assert_close(a, b)


def _slow_reference(q, k, v, rel_row, rel_col):
    """One query pixel and one memory pixel at a time, embeddings looked up by clipped offset."""
    B, heads, dk, H, W = q.shape
    m = (rel_row.shape[-1] + 1) // 2

    def index(offset):
        return min(max(offset, -(m - 1)), m - 1) + m - 1

    out = torch.zeros(B, heads, v.shape[2], H, W, dtype=q.dtype)
    for i in range(H):
        for j in range(W):
            qij = q[:, :, :, i, j, None] / math.sqrt(dk)  # (B, heads, dk, 1)
            r = torch.cat(  # (heads, dk, H*W): the embedding of every memory pixel's offset from (i, j)
                [
                    rel_row[:, :, [index(a - i) for a in range(H) for _ in range(W)]],
                    rel_col[:, :, [index(b - j) for _ in range(H) for b in range(W)]],
                ],
                dim=1,
            )
            logits = (qij * k.flatten(3)).sum(2) + (qij * r).sum(2)  # (B, heads, H*W)
            out[:, :, :, i, j] = torch.einsum("bhn,bhcn->bhc", logits.softmax(-1), v.flatten(3))
    return out


def test_equals_slow_reference_with_clipped_relative_embeddings():
    q, k, v = _qkv(H=4, W=5)
    max_extent = 3  # offsets reach +-4 on a 4x5 map: the outer ones are clipped to +-2
    rel_row, rel_col = (torch.randn(2, 2, 2 * max_extent - 1, dtype=D, requires_grad=True) for _ in range(2))
    inputs = (q, k, v, rel_row, rel_col)
    ours, ref = relative_global_attention(*inputs), _slow_reference(*inputs)
    torch.testing.assert_close(ours, ref)
    w = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad((ours * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        torch.testing.assert_close(a, b)


def _bot(**kw):
    torch.manual_seed(0)
    args = dict(in_channels=6, out_channels=8, heads=2, max_extent=3)
    args.update(kw)
    return BoTAttention2d(**args).double()


def _aa(**kw):
    torch.manual_seed(0)
    args = dict(in_channels=6, out_channels=40, heads=2, max_extent=3)  # dk = 8, dv = 4
    args.update(kw)
    return AttentionAugmentedConv2d(**args).double()


def test_bot_without_position_logits_is_permutation_equivariant_over_pixels():
    x = torch.randn(1, 6, 5, 6, dtype=D)
    perm = torch.randperm(30)
    permuted = x.flatten(2)[..., perm].view_as(x)
    layer = _bot(pos_enc="none")
    torch.testing.assert_close(layer(permuted).flatten(2), layer(x).flatten(2)[..., perm])
    layer = _bot(pos_enc="relative")  # relative logits see where pixels are
    assert not torch.allclose(layer(permuted).flatten(2), layer(x).flatten(2)[..., perm])


@pytest.mark.parametrize("make", [_bot, _aa], ids=["bot", "aa"])
@pytest.mark.parametrize("H,W", [(7, 9), (8, 8), (1, 1)])
def test_stride_two_matches_padded_conv_output_size(make, H, W):
    x = torch.randn(2, 6, H, W, dtype=D)
    layer = make(stride=2)
    assert layer(x).shape == (2, layer.out_channels, math.ceil(H / 2), math.ceil(W / 2))


@pytest.mark.parametrize("stride", [1, 2])
def test_aa_is_conv_branch_then_attention_branch(stride):
    layer = _aa(stride=stride)
    x = torch.randn(1, 6, 7, 9, dtype=D, requires_grad=True)
    out = layer(x)
    assert (layer.dk, layer.dv) == (8, 4)
    assert out.shape == (1, 40) + layer.conv(x).shape[2:]
    torch.testing.assert_close(out[:, : 40 - layer.dv], layer.conv(x))
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad.abs().sum() > 0, name
    conv_only = torch.autograd.grad(layer.conv(x).square().sum(), x)[0]
    assert not torch.allclose(x.grad, conv_only)  # the attention branch reaches the input too


def _params(layer):
    return sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("pos_enc", ["relative", "none"])
def test_parameter_counts(pos_enc):
    rel = pos_enc == "relative"
    C, O, m = 16, 32, 5
    bot = BoTAttention2d(C, O, heads=4, max_extent=m, pos_enc=pos_enc)
    assert _params(bot) == 3 * C * O + rel * O * (2 * m - 1)
    aa = AttentionAugmentedConv2d(C, 80, heads=8, max_extent=m, pos_enc=pos_enc)  # dk = 16, dv = 8
    dk, dv = 16, 8
    assert _params(aa) == 9 * C * (80 - dv) + C * (2 * dk + dv) + dv * dv + rel * dk * (2 * m - 1)


def _flops(layer, x):
    with FlopCounterMode(display=False) as counter:
        layer(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("pos_enc", ["relative", "none"])
@pytest.mark.parametrize("stride", [1, 2])
def test_bot_flops_match_closed_form(pos_enc, stride):
    C, O, H, W = 6, 8, 5, 7
    N, rel = H * W, pos_enc == "relative"
    macs = N * C * 3 * O + N * N * O + N * N * O + rel * N * (H + W) * O // 2  # qkv, logits, values, relative
    assert _flops(_bot(pos_enc=pos_enc, stride=stride), torch.randn(1, C, H, W, dtype=D)) == 2 * macs


@pytest.mark.parametrize("pos_enc", ["relative", "none"])
@pytest.mark.parametrize("stride", [1, 2])
def test_aa_flops_match_closed_form(pos_enc, stride):
    C, O, H, W, dk, dv = 6, 40, 5, 7, 8, 4
    N, rel = H * W, pos_enc == "relative"
    Ho, Wo = math.ceil(H / stride), math.ceil(W / stride)
    macs = (
        Ho * Wo * 9 * C * (O - dv)  # 3x3 conv branch
        + N * C * (2 * dk + dv)  # qkv
        + N * N * dk
        + N * N * dv  # logits, values
        + rel * N * (H + W) * dk // 2  # relative logits
        + Ho * Wo * dv * dv  # output projection
    )
    assert _flops(_aa(pos_enc=pos_enc, stride=stride), torch.randn(1, C, H, W, dtype=D)) == 2 * macs


BAD_BOT = [
    (dict(out_channels=12, heads=8), "out_channels"),
    (dict(out_channels=8, heads=8), "out_channels"),  # head dim 1 cannot split in row and column halves
    (dict(max_extent=0), "max_extent"),
    (dict(heads=0), "heads"),
    (dict(stride=3), "stride"),
    (dict(pos_enc="absolute"), "pos_enc"),
    (dict(in_channels=0), "in_channels"),
]


@pytest.mark.parametrize("kwargs,name", BAD_BOT)
def test_bot_bad_arguments_name_the_argument(kwargs, name):
    args = dict(in_channels=8, out_channels=16, heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        BoTAttention2d(**args)


BAD_AA = [
    (dict(dv_fraction=0), "dv_fraction"),
    (dict(dv_fraction=1.0), "dv_fraction"),  # nothing left for the convolution
    (dict(dk_fraction=1.5), "dk_fraction"),
    (dict(max_extent=0), "max_extent"),
    (dict(pos_enc="absolute"), "pos_enc"),
    (dict(stride=0), "stride"),
]


@pytest.mark.parametrize("kwargs,name", BAD_AA)
def test_aa_bad_arguments_name_the_argument(kwargs, name):
    args = dict(in_channels=8, out_channels=80)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        AttentionAugmentedConv2d(**args)


def test_extra_repr_shows_the_configuration():
    assert "heads=4, max_extent=16, pos_enc='relative'" in repr(BoTAttention2d(8, 16))
    assert "dk=16, dv=8" in repr(AttentionAugmentedConv2d(8, 80))


@pytest.mark.parametrize("width", [64, 128, 256, 512])
def test_aa_paper_fractions_fit_every_resnet50_width(width):
    """dk, dv: the nearest multiples of what 8 heads need (2 x 8 for relative keys, 8 for values)."""
    layer = AttentionAugmentedConv2d(width, width)
    assert layer.dk % 16 == 0 and layer.dv % 8 == 0
    assert abs(layer.dk - 0.2 * width) <= 8 and abs(layer.dv - 0.1 * width) <= 4
    assert layer(torch.randn(1, width, 5, 5)).shape == (1, width, 5, 5)
