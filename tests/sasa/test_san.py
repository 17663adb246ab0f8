"""SAN's pairwise and patchwise vector attention (sasa.layers.san) against its definition."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sasa.layers.san import SANPairwise2d, SANPatchwise2d

D = torch.float64
LAYERS = [SANPairwise2d, SANPatchwise2d]
# patchwise weights are unnormalised by default (the authors' code); softmax=True normalises them
WEIGHTINGS = [(SANPairwise2d, {}), (SANPatchwise2d, {}), (SANPatchwise2d, {"softmax": True})]


def _layer(cls, **kw):
    """A float64 layer with random batch-norm statistics and affine parameters, so that eval mode
    is not the identity."""
    torch.manual_seed(0)
    args = dict(in_channels=4, out_channels=8, kernel_size=3, share=2, reduction=4)
    args.update(kw)
    layer = cls(**args).double()
    with torch.no_grad():
        for m in layer.gamma:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return layer


def _reference(layer, x):
    """Vector attention written out per pixel and per footprint position (one image). Reuses the
    layer's phi, psi, beta, position and gamma, applied to one relation or patch vector at a time."""
    _, _, H, W = x.shape
    k, c, share = layer.kernel_size, layer.kernel_size // 2, layer.share
    phi, psi, val = layer.phi(x)[0], layer.psi(x)[0], layer.beta(x)[0]
    pairwise = isinstance(layer, SANPairwise2d)
    rows = []
    for i in range(H):
        row = []
        for j in range(W):
            offsets = [(dy, dx) for dy in range(-c, c + 1) for dx in range(-c, c + 1)]
            inside = [0 <= i + dy < H and 0 <= j + dx < W for dy, dx in offsets]
            if pairwise:
                relations = []
                for (dy, dx), ok in zip(offsets, inside):
                    if ok:
                        p = layer.position.weight.view(2, 2) @ torch.tensor([dy / max(c, 1), dx / max(c, 1)], dtype=D)
                        relations.append(torch.cat([phi[:, i, j] - psi[:, i + dy, j + dx], p]))
                # gamma (eval mode) maps each relation vector on its own; one call for the batch of them
                logits = layer.gamma(torch.stack(relations)[:, :, None, None]).flatten(
                    1
                )  # (in-image positions, out // share)
            else:
                zeros = torch.zeros_like(psi[:, 0, 0])
                keys = torch.stack([psi[:, i + dy, j + dx] if ok else zeros for (dy, dx), ok in zip(offsets, inside)])
                patch = torch.cat([phi[:, i, j], keys.t().flatten()])  # psi channel-major
                all_logits = layer.gamma(patch.view(1, -1, 1, 1)).view(-1, k * k).t()  # (k*k, out // share)
                logits = all_logits[torch.tensor(inside)]
            weights = (logits.softmax(dim=0) if layer.softmax else logits).repeat_interleave(
                share, dim=1
            )  # (in-image positions, out)
            values = torch.stack([val[:, i + dy, j + dx] for (dy, dx), ok in zip(offsets, inside) if ok])
            row.append((weights * values).sum(0))
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=-2)[None]


@pytest.mark.parametrize("cls,kw", WEIGHTINGS)
def test_matches_per_pixel_reference_forward_and_backward(cls, kw):
    layer = _layer(cls, **kw).eval()
    x = torch.randn(1, 4, 5, 6, dtype=D, requires_grad=True)
    out, ref = layer(x), _reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    wrt = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad((out * w).sum(), wrt), torch.autograd.grad((ref * w).sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls,kw", WEIGHTINGS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_constant_logits_average_beta_over_the_in_image_footprint(cls, kw, k):
    """With gamma's last conv a constant 1 every position gets the same weight, so each pixel
    averages beta(x_j) over the in-image part of its footprint (softmax) or sums it (unnormalised
    weights of 1): out-of-image positions are masked."""
    layer = _layer(cls, kernel_size=k, **kw)
    with torch.no_grad():
        layer.gamma[-1].weight.zero_()
        layer.gamma[-1].bias.fill_(1.0)
    x = torch.randn(2, 4, 5, 6, dtype=D)
    divisor = {} if layer.softmax else {"divisor_override": 1}
    expected = F.avg_pool2d(layer.beta(x), k, 1, k // 2, count_include_pad=False, **divisor)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", LAYERS)
def test_weights_are_shared_by_consecutive_value_channels(cls):
    """Make every value channel the same projection: outputs then differ only through the
    attention weights, so they are equal within each group of `share` consecutive channels and
    differ between groups."""
    layer = _layer(cls, share=4).eval()
    with torch.no_grad():
        layer.beta.weight.copy_(layer.beta.weight[:1].expand_as(layer.beta.weight))
        if layer.beta.bias is not None:
            layer.beta.bias.fill_(0.5)
    out = layer(torch.randn(1, 4, 5, 6, dtype=D)).view(1, 2, 4, 5, 6)  # (B, groups, share, H, W)
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))
    assert not torch.allclose(out[:, 0], out[:, 1])


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_receptive_field_is_exactly_the_footprint(cls, k):
    layer = _layer(cls, kernel_size=k).eval()  # eval: batch statistics would couple all pixels
    x = torch.randn(1, 4, 9, 9, dtype=D, requires_grad=True)
    i, j = 4, 3
    layer(x)[0, :, i, j].sum().backward()
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[i - k // 2 : i + k // 2 + 1, j - k // 2 : j + k // 2 + 1] = True
    assert torch.equal(x.grad[0].abs().sum(0) > 0, expected)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("size,expected", [((7, 9), (4, 5)), ((8, 8), (4, 4)), ((1, 1), (1, 1))])
def test_stride_two_output_size(cls, size, expected):
    out = _layer(cls, stride=2)(torch.randn(2, 4, *size, dtype=D))
    assert out.shape == (2, 8, *expected)


BAD = [
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(share=0), "share"),
    (dict(share=3), "share"),
    (dict(reduction=0), "reduction"),
    (dict(reduction=3), "reduction"),
    (dict(stride=3), "stride"),
    (dict(in_channels=0), "in_channels"),
    (dict(out_channels=-8), "out_channels"),
]


def test_patchwise_softmax_is_a_yes_or_no():
    with pytest.raises(ValueError, match="softmax"):
        SANPatchwise2d(4, 8, softmax="no")


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("kwargs,name", BAD)
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    args = dict(in_channels=4, out_channels=8, kernel_size=3, share=2, reduction=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        cls(**args)


def _pairwise_params(cin, cout, k, share, reduction):
    r, g = cout // reduction, cout // share
    return cin * (2 * r + cout) + 4 + 2 * (r + 2) + (r + 2) * r + 2 * r + r * g + g


def _patchwise_params(cin, cout, k, share, reduction):
    r, g, kk = cout // reduction, cout // share, k * k
    return (
        cin * (2 * r + cout) + cout + 2 * r * (kk + 1) + r * (kk + 1) * g + 2 * g + g * g * kk + g * kk
    )  # + cout: beta's bias


def _pairwise_macs(cin, cout, k, share, reduction, H, W):
    """phi, psi, beta at every pixel; the position conv on the k*k offsets; gamma's two convs on
    H*W*k*k relation vectors; the weighted sum (einsum), k*k*cout per pixel."""
    r, g, kk, hw = cout // reduction, cout // share, k * k, H * W
    return hw * cin * (2 * r + cout) + 4 * kk + hw * kk * ((r + 2) * r + r * g) + hw * kk * cout


def _patchwise_macs(cin, cout, k, share, reduction, H, W):
    """phi, psi, beta at every pixel; gamma's two convs on H*W patch vectors; the weighted sum."""
    r, g, kk, hw = cout // reduction, cout // share, k * k, H * W
    return hw * cin * (2 * r + cout) + hw * (r * (kk + 1) * g + g * g * kk) + hw * kk * cout


FORMULAS = {SANPairwise2d: (_pairwise_params, _pairwise_macs), SANPatchwise2d: (_patchwise_params, _patchwise_macs)}


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_parameters_and_flops_match_closed_forms(cls, k, stride):
    cin, cout, share, reduction, H, W = 16, 32, 8, 4, 7, 9
    layer = cls(cin, cout, stride, kernel_size=k, share=share, reduction=reduction).eval()
    params, macs = FORMULAS[cls]
    assert sum(p.numel() for p in layer.parameters()) == params(cin, cout, k, share, reduction)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, cin, H, W))
    assert counter.get_total_flops() == 2 * macs(cin, cout, k, share, reduction, H, W)


@pytest.mark.parametrize("cls", LAYERS)
def test_extra_repr_names_the_options(cls):
    assert (
        cls(4, 8, 2, kernel_size=5, share=4, reduction=2).extra_repr()
        == f"4, 8, stride=2, kernel_size=5, share=4, reduction=2, softmax={cls is SANPairwise2d}, impl='fast'"
    )
