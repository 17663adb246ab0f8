"""The attention stems compute the paper's attention within 4x4 tiles, with spatially-aware values,
plain values or values from a 3x3 convolution (the paper's stem ablation)."""

import pytest
import torch

import sasa
from sasa.layers import STEMS, StemAttention2d

D = torch.float64


def _value(layer, x, a, c, sl):
    """Head slice ``sl`` of the value of pixel (a, c), written out for each kind of stem."""
    b, C = layer.block_size, layer.out_channels
    W_V = layer.values.weight
    if layer.value_kind == "plain":
        return W_V[sl, :, 0, 0] @ x[0, :, a, c]
    if layer.value_kind == "conv":  # sum over the 3x3 neighbours inside the image
        H, W = x.shape[-2:]
        return sum(
            W_V[sl, :, 1 + di, 1 + dj] @ x[0, :, a + di, c + dj]
            for di in (-1, 0, 1)
            for dj in (-1, 0, 1)
            if 0 <= a + di < H and 0 <= c + dj < W
        )
    p = ((layer.emb_row[a % b] + layer.emb_col[c % b]) @ layer.mixture_logits.t()).softmax(0)
    per_mixture = (W_V[:, :, 0, 0] @ x[0, :, a, c]).view(layer.mixtures, C)
    return (p[:, None] * per_mixture[:, sl]).sum(0)


def _explicit(layer, x):
    """Per-pixel loop: attend over the in-image pixels of one's own tile."""
    B, _, H, W = x.shape
    b, heads, hd = layer.block_size, layer.heads, layer.head_dim
    C = layer.out_channels
    qk = torch.einsum("oc,bchw->bohw", layer.qk.weight[:, :, 0, 0], x)
    out = torch.zeros(B, C, H, W, dtype=x.dtype)
    for i in range(H):
        for j in range(W):
            keys = [
                (a, c)
                for a in range(i - i % b, i - i % b + b)
                for c in range(j - j % b, j - j % b + b)
                if a < H and c < W
            ]
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                q = qk[0, sl, i, j]
                logits, values = [], []
                for a, c in keys:
                    r = torch.cat(
                        [layer.rel_row[h, :, a % b - i % b + b - 1], layer.rel_col[h, :, c % b - j % b + b - 1]]
                    )
                    logits.append(q @ (qk[0, C + h * hd : C + (h + 1) * hd, a, c] + r))
                    values.append(_value(layer, x, a, c, sl))
                out[0, sl, i, j] = torch.stack(logits).softmax(0) @ torch.stack(values)
    return out


@pytest.mark.parametrize("values", ["spatially_aware", "plain", "conv"])
@pytest.mark.parametrize("H,W", [(8, 8), (5, 6), (2, 3)])
def test_stem_attention_matches_explicit_formula_forward_and_backward(H, W, values):
    torch.manual_seed(0)
    layer = StemAttention2d(3, 8, block_size=4, heads=2, mixtures=4, values=values).double()
    x = torch.randn(1, 3, H, W, dtype=D, requires_grad=True)
    out, ref = layer(x), _explicit(layer, x)
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(out)
    params = [x, *layer.parameters()]
    for g, g_ref in zip(
        torch.autograd.grad((out * weights).sum(), params), torch.autograd.grad((ref * weights).sum(), params)
    ):
        torch.testing.assert_close(g, g_ref)


def test_plain_values_are_spatially_aware_values_with_one_mixture():
    torch.manual_seed(0)
    plain = StemAttention2d(3, 8, heads=2, values="plain").double()
    mixed = StemAttention2d(3, 8, heads=2, mixtures=1).double()
    mixed.load_state_dict(plain.state_dict(), strict=False)  # q, k, values and the relative embeddings
    x = torch.randn(2, 3, 9, 7, dtype=D)
    torch.testing.assert_close(plain(x), mixed(x))


def test_stem_flops_differ_exactly_by_how_the_values_are_computed():
    """Counted by torch's flop counter; the differences are closed forms (2 FLOPs per multiply-add)."""
    cin, C, H, W, m, b = 3, 16, 12, 12, 4, 4
    flops = {
        v: sasa.count(StemAttention2d(cin, C, heads=2, mixtures=m, values=v), (cin, H, W)).flops
        for v in ("plain", "conv", "spatially_aware")
    }
    assert flops["conv"] - flops["plain"] == 2 * H * W * C * cin * (3 * 3 - 1)
    # m projections instead of one, the per-pixel mixing, and the b x b x m mixing weights (emb . nu)
    assert flops["spatially_aware"] - flops["plain"] == 2 * (H * W * C * cin * (m - 1) + H * W * m * C + b * b * m * C)


@pytest.mark.parametrize("stem", ["attention", "attention_plain", "attention_conv_values"])
def test_every_attention_stem_builds_a_resnet_and_trains_a_step(stem):
    model = sasa.create_model(
        "resnet26",
        form="conv_stem_attention",
        stem=stem,
        width=0.125,
        heads=2,
        small_input=True,
        num_classes=10,
        in_chans=1,
    )
    assert (
        model.stem.attn.value_kind
        == {"attention": "spatially_aware", "attention_plain": "plain", "attention_conv_values": "conv"}[stem]
    )
    model(torch.randn(2, 1, 16, 16)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.stem.parameters() if p.requires_grad)


def test_stem_attention_sees_only_its_tile():
    layer = StemAttention2d(3, 8, heads=2).double()
    x = torch.randn(1, 3, 12, 12, dtype=D, requires_grad=True)
    layer(x)[0, :, 5, 6].sum().backward()
    reached = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[4:8, 4:8] = True
    assert torch.equal(reached, expected)


@pytest.mark.parametrize("make", STEMS.values())
@pytest.mark.parametrize("small_input,size,expected", [(False, 224, 56), (False, 30, 8), (True, 28, 28)])
def test_stems_downsample_by_4_or_1(make, small_input, size, expected):
    stem = make(3, 16, small_input=small_input, heads=2)
    assert stem(torch.randn(1, 3, size, size)).shape == (1, 16, expected, expected)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(mixtures=0), "mixtures"),
        (dict(out_channels=10, heads=4), "out_channels"),
        (dict(pos_enc="absolute"), "pos_enc"),
        (dict(values="convolution"), "values"),
    ],
)
def test_stem_bad_arguments(kwargs, name):
    args = dict(in_channels=3, out_channels=16, heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        StemAttention2d(**args)
