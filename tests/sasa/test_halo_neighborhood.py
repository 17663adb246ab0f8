"""HaloNet and Neighborhood Attention mixers: their defining relations to SASA, slow references,
FLOP counts and parameter counts."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sasa import SASA2d
from sasa.layers.halo import HaloAttention2d
from sasa.layers.neighborhood import NeighborhoodAttention2d

D = torch.float64
C_IN, C_OUT, HEADS = 6, 8, 2


def _halo(**kw):
    torch.manual_seed(0)
    args = dict(block_size=4, halo=1, heads=HEADS)
    args.update(kw)
    return HaloAttention2d(C_IN, C_OUT, **args).double()


def _na(**kw):
    torch.manual_seed(0)
    args = dict(kernel_size=3, heads=HEADS)
    args.update(kw)
    return NeighborhoodAttention2d(C_IN, C_OUT, **args).double()


def _input(H, W, B=1):
    torch.manual_seed(1)
    return torch.randn(B, C_IN, H, W, dtype=D, requires_grad=True)


def _grads(layer, x, forward=None):
    """Output of ``forward`` (default: the layer) and the gradients of a fixed random scalar loss
    wrt the input and every parameter of the layer."""
    out = (forward or layer)(x)
    w = torch.randn(out.shape, dtype=D, generator=torch.Generator().manual_seed(2))
    return out, torch.autograd.grad((out * w).sum(), [x, *layer.parameters()])


def _slow_attention(layer, x, window, offset_index):
    """Per pixel: gather the keys ``window(i, j)`` lists, softmax over q.k + q.[rel_row, rel_col]
    (+ the learned bias of the offset, NAT's, where the layer has one), average the values.
    ``offset_index(key, query)`` is the embedding index of one axis."""
    B, _, H, W = x.shape
    heads, d = layer.heads, layer.head_dim
    q, k, v = layer.qkv(x).view(B, 3, heads, d, H, W).unbind(1)
    outs = []
    for i in range(H):
        for j in range(W):
            keys = window(i, j)
            rows, cols = torch.tensor(keys).T
            qij = q[..., i, j]
            logits = torch.einsum("zhd,zhdn->zhn", qij, k[..., rows, cols])
            if layer.rel_row is not None:
                r = torch.cat(
                    [layer.rel_row[:, :, offset_index(rows, i)], layer.rel_col[:, :, offset_index(cols, j)]], 1
                )  # (heads, d, keys)
                logits = logits + torch.einsum("zhd,hdn->zhn", qij, r)
            if getattr(layer, "rel_bias", None) is not None:
                logits = logits + layer.rel_bias[:, offset_index(rows, i), offset_index(cols, j)]
            outs.append(torch.einsum("zhn,zhdn->zhd", logits.softmax(-1), v[..., rows, cols]))
    return torch.stack(outs, -1).reshape(B, heads * d, H, W)


def _slow_halo(layer, x):
    """The block's (b+2h)^2 window, only its in-image pixels."""
    H, W = x.shape[-2:]
    b, h = layer.block_size, layer.halo

    def window(i, j):
        r0, c0 = i // b * b - h, j // b * b - h
        return [
            (a, c) for a in range(r0, r0 + b + 2 * h) for c in range(c0, c0 + b + 2 * h) if 0 <= a < H and 0 <= c < W
        ]

    return _slow_attention(layer, x, window, lambda key, query: key - query + b + h - 1)


def _slow_neighborhood(layer, x):
    """The k x k window starting at min(max(i - k//2, 0), H - k)."""
    H, W = x.shape[-2:]
    k = layer.kernel_size

    def window(i, j):
        r0, c0 = min(max(i - k // 2, 0), H - k), min(max(j - k // 2, 0), W - k)
        return [(a, c) for a in range(r0, r0 + k) for c in range(c0, c0 + k)]

    return _slow_attention(layer, x, window, lambda key, query: key - query + k - 1)


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def _flops(layer, x):
    with FlopCounterMode(display=False) as counter:
        layer(x)
    return counter.get_total_flops()


def _n_params(layer):
    return sum(p.numel() for p in layer.parameters())


# --- HaloAttention2d


@pytest.mark.parametrize("pos_enc", ["relative", "none"])
@pytest.mark.parametrize("halo", [1, 2])
def test_halo_with_block_size_one_is_sasa(halo, pos_enc):
    """b=1: every pixel is its own block, its window the (2h+1)^2 SASA window, masked alike at the
    borders; the 2(1+h)-1 = 2h+1 embeddings are SASA's, indexed alike. Equal everywhere."""
    layer = _halo(block_size=1, halo=halo, pos_enc=pos_enc)
    torch.manual_seed(3)
    sasa = SASA2d(C_IN, C_OUT, kernel_size=2 * halo + 1, heads=HEADS, pos_enc=pos_enc, impl="reference").double()
    sasa.load_state_dict(layer.state_dict())
    x = _input(7, 9)
    _assert_same(_grads(layer, x), _grads(sasa, x))


@pytest.mark.parametrize("block_size,halo,pos_enc", [(4, 1, "relative"), (4, 1, "none"), (3, 0, "relative")])
def test_halo_matches_slow_per_pixel_reference(block_size, halo, pos_enc):
    layer = _halo(block_size=block_size, halo=halo, pos_enc=pos_enc)
    x = _input(6, 7)
    _assert_same(_grads(layer, x), _grads(layer, x, lambda t: _slow_halo(layer, t)))


def test_halo_on_map_not_a_multiple_of_the_block_runs_and_trains():
    layer = _halo(block_size=4, halo=2)
    x = _input(9, 13, B=2)
    out, grads = _grads(layer, x)
    assert out.shape == (2, C_OUT, 9, 13)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert (grads[0].abs().sum(1) > 0).all()  # every input pixel reaches some output


@pytest.mark.parametrize("H,W", [(9, 13), (8, 8), (1, 1)])
def test_halo_stride_two_halves_with_ceil(H, W):
    assert _halo(stride=2)(_input(H, W)).shape == (1, C_OUT, -(-H // 2), -(-W // 2))


@pytest.mark.parametrize("pos_enc", ["relative", "none"])
def test_halo_flops_closed_form(pos_enc):
    """qkv 1x1 conv, then per padded block and head b^2 (b+2h)^2 d MACs for the logits and as many
    for the weighted values, plus b^2 (b+2h) d for the row and column relative tables."""
    b, h, H, W = 4, 2, 9, 13
    layer = _halo(block_size=b, halo=h, pos_enc=pos_enc)
    d, w, blocks = C_OUT // HEADS, b + 2 * h, -(-H // b) * -(-W // b)
    relative = b * b * w * d if pos_enc == "relative" else 0
    macs = C_IN * 3 * C_OUT * H * W + HEADS * blocks * (2 * b * b * w * w * d + relative)
    assert _flops(layer, _input(H, W)) == 2 * macs


def test_halo_parameters():
    """qkv projections + one d_out-wide vector per row and per column offset, 2(b+h)-1 offsets."""
    for b, h in [(8, 3), (4, 1), (1, 2)]:
        layer = HaloAttention2d(64, 128, block_size=b, halo=h, heads=8)
        assert _n_params(layer) == 3 * 64 * 128 + 128 * (2 * (b + h) - 1)
    assert _n_params(HaloAttention2d(64, 128, pos_enc="none")) == 3 * 64 * 128


HALO_BAD = [
    (dict(block_size=0), "block_size"),
    (dict(halo=-1), "halo"),
    (dict(heads=3), "out_channels"),
    (dict(heads=0), "heads"),
    (dict(out_channels=8, heads=8), "out_channels"),  # head dim 1 cannot split in halves
    (dict(pos_enc="absolute"), "pos_enc"),
    (dict(stride=3), "stride"),
]


@pytest.mark.parametrize("kwargs,name", HALO_BAD)
def test_halo_bad_arguments_name_the_argument(kwargs, name):
    args = dict(in_channels=8, out_channels=16, heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        HaloAttention2d(**args)


# --- NeighborhoodAttention2d


@pytest.mark.parametrize("pos_enc", ["relative", "none"])
@pytest.mark.parametrize("k", [3, 5])
def test_neighborhood_is_sasa_away_from_borders(k, pos_enc):
    """Where the window need not shift it is SASA's window; SASA's offset o in -(k//2)..k//2 is
    index o + k//2 of its k embeddings and index o + k - 1 of the 2k-1 here."""
    layer = _na(kernel_size=k, pos_enc=pos_enc)
    sasa = SASA2d(C_IN, C_OUT, kernel_size=k, heads=HEADS, pos_enc=pos_enc, impl="reference").double()
    state = layer.state_dict()
    if pos_enc == "relative":
        state = {
            **state,
            "rel_row": state["rel_row"][:, :, k // 2 : k // 2 + k],
            "rel_col": state["rel_col"][:, :, k // 2 : k // 2 + k],
        }
    sasa.load_state_dict(state)
    x = _input(9, 11)
    c = k // 2
    torch.testing.assert_close(
        layer(x)[..., c : 9 - c, c : 11 - c], sasa(x)[..., c : 9 - c, c : 11 - c], rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("k", [3, 5])
def test_neighborhood_corner_pixels_see_k_squared_in_image_keys(k):
    H, W = 7, 8
    layer = _na(kernel_size=k)
    idx = layer.neighbour_index(H, W)
    for (i, j), (r0, c0) in {(0, 0): (0, 0), (H - 1, W - 1): (H - k, W - k), (0, W - 1): (0, W - k)}.items():
        expected = {(r0 + a) * W + c0 + c for a in range(k) for c in range(k)}
        assert len(set(idx[i, j].tolist())) == k * k and set(idx[i, j].tolist()) == expected
    x = _input(H, W)
    layer(x)[0, :, 0, 0].sum().backward()
    reached = torch.zeros(H, W, dtype=torch.bool)
    reached[:k, :k] = True
    assert torch.equal(x.grad[0].abs().sum(0) > 0, reached)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("pos_enc,bias", [("relative", False), ("none", False), ("none", True), ("relative", True)])
def test_neighborhood_matches_slow_per_pixel_reference(pos_enc, bias, impl):
    """bias=True with pos_enc="none" is NAT's logit, q.k + b[head, offset]."""
    layer = _na(kernel_size=3, pos_enc=pos_enc, bias=bias, impl=impl)
    x = _input(6, 7)
    _assert_same(_grads(layer, x), _grads(layer, x, lambda t: _slow_neighborhood(layer, t)))


@pytest.mark.parametrize("H,W", [(9, 13), (8, 8), (3, 3)])
def test_neighborhood_stride_two_halves_with_ceil(H, W):
    assert _na(stride=2)(_input(H, W)).shape == (1, C_OUT, -(-H // 2), -(-W // 2))


@pytest.mark.parametrize("pos_enc", ["relative", "none"])
def test_neighborhood_flops_closed_form(pos_enc):
    """qkv 1x1 conv, then per pixel and head k^2 d MACs for the logits and as many for the weighted
    values, plus k d for the row and column relative tables."""
    k, H, W = 3, 9, 13
    layer = _na(kernel_size=k, pos_enc=pos_enc)
    d = C_OUT // HEADS
    relative = k * d if pos_enc == "relative" else 0
    macs = C_IN * 3 * C_OUT * H * W + HEADS * H * W * (2 * k * k * d + relative)
    assert _flops(layer, _input(H, W)) == 2 * macs


def test_neighborhood_parameters():
    """qkv projections + one d_out-wide vector per row and per column offset, 2k-1 offsets."""
    for k in (3, 7):
        assert _n_params(NeighborhoodAttention2d(64, 128, kernel_size=k, heads=8)) == 3 * 64 * 128 + 128 * (2 * k - 1)
    assert _n_params(NeighborhoodAttention2d(64, 128, pos_enc="none")) == 3 * 64 * 128
    assert (
        _n_params(NeighborhoodAttention2d(64, 128, pos_enc="none", bias=True)) == 3 * 64 * 128 + 8 * 13 * 13
    )  # NAT's table


def test_neighborhood_map_smaller_than_kernel_is_an_error():
    with pytest.raises(ValueError, match=r"kernel_size=5.*4 x 6"):
        _na(kernel_size=5)(_input(4, 6))


NA_BAD = [
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(heads=3), "out_channels"),
    (dict(heads=0), "heads"),
    (dict(out_channels=8, heads=8), "out_channels"),
    (dict(pos_enc="absolute"), "pos_enc"),
    (dict(stride=3), "stride"),
    (dict(bias="yes"), "bias"),
]


@pytest.mark.parametrize("kwargs,name", NA_BAD)
def test_neighborhood_bad_arguments_name_the_argument(kwargs, name):
    args = dict(in_channels=8, out_channels=16, heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        NeighborhoodAttention2d(**args)


@pytest.mark.parametrize("cls", [HaloAttention2d, NeighborhoodAttention2d])
def test_repr_shows_the_configuration(cls):
    text = repr(cls(8, 16, 2, heads=2))
    assert "8, 16, stride=2" in text and "heads=2" in text and "pos_enc='relative'" in text
