"""The later mixers of the literature: g^n Conv (HorNet) and quadratic-encoding attention
(Cordonnier et al.), each by its defining property (float64, forward and backward) and its exact
FLOPs against a closed form."""
import pytest
import torch
import torch.nn.functional as F

import sasa
from sasa.layers import create_mixer
from sasa.layers.gnconv import GnConv2d
from sasa.layers.quadratic import QuadraticAttention2d


def _gnconv(order, k=3, channels=8):
    torch.manual_seed(0)
    layer = GnConv2d(channels, channels, kernel_size=k, order=order).double()
    for m in layer.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.bias)
    return layer


@pytest.mark.parametrize("order", [1, 2, 3])
def test_gnconv_is_a_homogeneous_polynomial_of_degree_order_plus_one(order):
    """Each recursion multiplies one more projected input in: f(t x) = t^(n+1) f(x) (biases zero)."""
    layer = _gnconv(order)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    y = layer(x)
    assert torch.allclose(layer(3 * x), 3 ** (order + 1) * y)
    assert not torch.allclose(layer(3 * x), 3**order * y)


@pytest.mark.parametrize("order", [1, 3])
def test_gnconv_reads_only_its_k_by_k_neighbourhood(order):
    layer = _gnconv(order, k=3)
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64, requires_grad=True)
    layer(x)[0, :, 3, 3].sum().backward()
    reached = x.grad.abs().sum(1)[0] > 0
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[2:5, 2:5] = True
    assert torch.equal(reached, expected)


def test_gnconv_flops_match_the_closed_form():
    C, H, W, k = 16, 5, 6, 7
    dims = [4, 8, 16]  # order 3: C/4, C/2, C
    per_pixel = C * (dims[0] + sum(dims)) + k * k * sum(dims) + dims[0] * dims[1] + dims[1] * dims[2] + C * C
    assert sasa.count(GnConv2d(C, C, kernel_size=k, order=3), (C, H, W)).macs == per_pixel * H * W
    with pytest.raises(ValueError, match="out_channels=6 must be divisible by 4"):
        GnConv2d(6, 6, order=3)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("k", [3, 5])
def test_quadratic_attention_with_k_squared_heads_is_a_convolution(k, impl):
    """Theorem 1 of Cordonnier et al.: one head per kernel offset, sharp enough to attend to that
    offset only, value maps the identity, output projection the kernel's taps. Checked away from
    the borders (there attention has no zero padding to read)."""
    torch.manual_seed(0)
    weight = torch.randn(4, 3, k, k, dtype=torch.float64)
    layer = QuadraticAttention2d.from_convolution(weight, alpha=60.0, impl=impl)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    y, ref = layer(x), F.conv2d(x, weight, padding=k // 2)
    c = k // 2
    inner = (slice(None), slice(None), slice(c, 9 - c), slice(c, 8 - c))
    assert torch.allclose(y[inner], ref[inner], atol=1e-12)
    g = torch.zeros_like(y)
    g[inner] = torch.randn_like(y[inner])
    (gy,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gy, gr, atol=1e-12)


def _reference_quadratic(layer, x):
    """Pixel by pixel and head by head: softmax over all keys of content + position logits."""
    B, _, H, W = x.shape
    q, kk = layer.qk(x).view(B, 2, layer.heads, layer.head_dim, H * W).unbind(1)
    v = layer.v(x).view(B, layer.heads, layer.value_dim, H * W)
    pos = [(i, j) for i in range(H) for j in range(W)]
    out = torch.zeros(B, layer.heads, layer.value_dim, H * W, dtype=x.dtype)
    for h in range(layer.heads):
        alpha, (cy, cx) = layer.log_alpha[h].exp(), layer.centre[h]
        for a, (i, j) in enumerate(pos):
            logits = torch.stack([
                (q[:, h, :, a] * kk[:, h, :, b]).sum(-1) / layer.head_dim**0.5 - alpha * ((p - i - cy) ** 2 + (r - j - cx) ** 2)
                for b, (p, r) in enumerate(pos)], -1)
            out[:, h, :, a] = (logits.softmax(-1)[:, None, :] * v[:, h]).sum(-1)
    return layer.proj(out.reshape(B, -1, H, W))


def test_quadratic_attention_equals_its_pixelwise_reference():
    torch.manual_seed(0)
    layer = QuadraticAttention2d(6, 8, heads=2, impl="reference").double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    y, ref = layer(x), _reference_quadratic(layer, x)
    assert torch.allclose(y, ref)
    g = torch.randn_like(y)
    params = (x, layer.centre, layer.log_alpha, layer.qk.weight)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)))


def test_quadratic_attention_flops_match_the_closed_form():
    C, H, W, heads = 16, 4, 5, 4
    n, d = H * W, C // heads
    macs = n * C * 2 * C + n * C * C + heads * n * n * d * 2 + n * C * C  # q and k, v, q.k and weights x v, output
    layer = create_mixer("quadratic", C, C, 1, {"heads": heads, "kernel_size": 3})
    assert sasa.count(layer, (C, H, W)).macs == macs


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("content,stride,shape", [(True, 1, (2, 12, 7, 5)), (False, 1, (1, 12, 4, 9)), (True, 2, (2, 12, 9, 6))])
def test_quadratic_fast_path_equals_the_reference(dtype, tol, content, stride, shape):
    torch.manual_seed(0)
    fast = QuadraticAttention2d(12, 8, stride, heads=4, content=content).to(dtype)
    ref = QuadraticAttention2d(12, 8, stride, heads=4, content=content, impl="reference").to(dtype)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    y, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, *fast.parameters()), g), torch.autograd.grad(y_ref, (x, *ref.parameters()), g)):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)
