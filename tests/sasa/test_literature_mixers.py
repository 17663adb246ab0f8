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
            logits = torch.stack(
                [
                    (q[:, h, :, a] * kk[:, h, :, b]).sum(-1) / layer.head_dim**0.5
                    - alpha * ((p - i - cy) ** 2 + (r - j - cx) ** 2)
                    for b, (p, r) in enumerate(pos)
                ],
                -1,
            )
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
    assert all(
        torch.allclose(a, b) for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g))
    )


def test_quadratic_attention_flops_match_the_closed_form():
    C, H, W, heads = 16, 4, 5, 4
    n, d = H * W, C // heads
    macs = n * C * 2 * C + n * C * C + heads * n * n * d * 2 + n * C * C  # q and k, v, q.k and weights x v, output
    layer = create_mixer("quadratic", C, C, 1, {"heads": heads, "kernel_size": 3})
    assert sasa.count(layer, (C, H, W)).macs == macs


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "content,stride,shape", [(True, 1, (2, 12, 7, 5)), (False, 1, (1, 12, 4, 9)), (True, 2, (2, 12, 9, 6))]
)
def test_quadratic_fast_path_equals_the_reference(dtype, tol, content, stride, shape):
    torch.manual_seed(0)
    fast = QuadraticAttention2d(12, 8, stride, heads=4, content=content).to(dtype)
    ref = QuadraticAttention2d(12, 8, stride, heads=4, content=content, impl="reference").to(dtype)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    y, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, (x, *fast.parameters()), g), torch.autograd.grad(y_ref, (x, *ref.parameters()), g)
    ):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


def _acmix(**kwargs):
    torch.manual_seed(0)
    from sasa.layers.acmix import ACmix2d

    layer = ACmix2d(6, 8, **{"kernel_size": 3, "heads": 2, "impl": "reference", **kwargs}).double()
    for conv in (layer.q, layer.k, layer.v):
        torch.nn.init.normal_(conv.bias, std=0.5)
    return layer


def test_acmix_attention_path_is_local_attention_with_the_coordinate_term():
    """Pixel by pixel: softmax over the in-image keys of the 3 x 3 window of q_i . (k_j + p_i - p_j) / sqrt(d)."""
    from sasa.layers.acmix import coordinates

    layer = _acmix()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    q, k, v = layer.q(x), layer.k(x), layer.v(x)
    p = layer.pos(coordinates(4, 5, dtype=torch.float64))[0]
    out = torch.zeros(2, 8, 4, 5, dtype=torch.float64)
    for h in range(2):
        c = slice(4 * h, 4 * h + 4)
        for i in range(4):
            for j in range(5):
                window = [(a, b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if 0 <= a < 4 and 0 <= b < 5]
                logits = torch.stack(
                    [(q[:, c, i, j] * (k[:, c, a, b] + p[:, i, j] - p[:, a, b])).sum(-1) / 2 for a, b in window], -1
                )
                w = logits.softmax(-1)
                out[:, c, i, j] = sum(w[:, n, None] * v[:, c, a, b] for n, (a, b) in enumerate(window))
    assert torch.allclose(layer.attention(q, k, v), out)


def test_acmix_convolution_path_starts_as_shift_and_sum_of_the_shared_projections():
    """Map s = sum over the 3 x heads projections of fc[s] times them, moved by offset s (zeros
    beyond the border); the path is the sum of the c^2 moved maps."""
    layer = _acmix()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    q, k, v = layer.q(x), layer.k(x), layer.v(x)
    feats = torch.cat([t.view(2, 2, 4, 4, 5) for t in (q, k, v)], 1)  # (B, 3 heads, d, H, W)
    maps = torch.einsum("sj,bjdhw->bsdhw", layer.fc.weight[:, :, 0, 0], feats)  # (B, 9, d, H, W)
    padded = F.pad(maps, (1, 1, 1, 1))
    summed = sum(padded[:, s, :, s // 3 : s // 3 + 4, s % 3 : s % 3 + 5] for s in range(9))  # (B, d, H, W)
    expected = summed.repeat_interleave(2, dim=1)  # channel d feeds the heads' outputs of group d
    assert torch.allclose(layer.convolution(q, k, v), expected)


def test_acmix_mixes_both_paths_by_learned_rates():
    layer = _acmix()
    x = torch.randn(1, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    q, k, v = layer.q(x), layer.k(x), layer.v(x)
    expected = 0.5 * layer.attention(q, k, v) + 0.5 * layer.convolution(q, k, v)
    y = layer(x)
    assert torch.allclose(y, expected)
    y.sum().backward()
    assert layer.rate_att.grad is not None and layer.rate_conv.grad is not None


def test_acmix_flops_match_the_closed_form():
    from sasa.layers.acmix import ACmix2d

    C, H, W, n, k, c = 8, 5, 4, 2, 3, 3
    d, hw = C // n, H * W
    macs = (
        3 * C * C * hw
        + 2 * d * hw  # q, k, v and the coordinates' map
        + n * d * k * k * hw
        + n * d * hw  # q . (k_j - p_j) and q . p_i
        + n * k * k * d * hw  # weights x values
        + c * c * 3 * n * d * hw  # fc
        + C * c * c * c * c * hw
    )  # shift convolution: each output reads c^2 maps over c x c taps
    assert sasa.count(ACmix2d(C, C, kernel_size=k, heads=n, conv_kernel=c), (C, H, W)).macs == macs


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "k,stride,shape", [(3, 1, (2, 6, 4, 5)), (5, 1, (1, 6, 9, 7)), (7, 2, (2, 6, 6, 11)), (3, 1, (1, 6, 1, 6))]
)
def test_acmix_fast_path_equals_the_reference(dtype, tol, k, stride, shape):
    from sasa.layers.acmix import ACmix2d

    torch.manual_seed(0)
    fast = ACmix2d(6, 8, stride, kernel_size=k, heads=2).to(dtype)
    ref = ACmix2d(6, 8, stride, kernel_size=k, heads=2, impl="reference").to(dtype)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    y, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, (x, *fast.parameters()), g), torch.autograd.grad(y_ref, (x, *ref.parameters()), g)
    ):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


def _qna():
    from sasa.layers.qna import QnA2d

    torch.manual_seed(0)
    layer = QnA2d(6, 8, kernel_size=3, heads=2, queries=2).double()
    torch.nn.init.normal_(layer.bias)
    return layer


def test_qna_is_softmax_attention_of_learned_queries_over_each_window():
    layer = _qna()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    key, value = layer.kv(x).view(2, 2, 2, 4, 4, 5).unbind(1)  # (B, heads, d, H, W)
    outs = torch.zeros(2, 2, 2, 4, 4, 5, dtype=torch.float64)  # (B, queries, heads, d, H, W)
    for l in range(2):
        for h in range(2):
            for i in range(4):
                for j in range(5):
                    window = [
                        (a, b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if 0 <= a < 4 and 0 <= b < 5
                    ]
                    logits = torch.stack(
                        [
                            key[:, h, :, a, b] @ layer.query[l, h] / 2 + layer.bias[l, h, a - i + 1, b - j + 1]
                            for a, b in window
                        ],
                        -1,
                    )
                    w = logits.softmax(-1)
                    outs[:, l, h, :, i, j] = sum(
                        w[:, m, None] * value[:, h, :, a, b] for m, (a, b) in enumerate(window)
                    )
    expected = layer.proj(outs.reshape(2, 16, 4, 5))
    y = layer(x)
    assert torch.allclose(y, expected)
    g = torch.randn_like(y)
    params = (x, layer.query, layer.bias)
    assert all(
        torch.allclose(a, b)
        for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g))
    )


def test_qna_is_shift_invariant_and_linear_in_pixels():
    layer = _qna()
    x = torch.randn(1, 6, 10, 11, dtype=torch.float64)
    y, y_shifted = layer(x), layer(x[:, :, 2:, 3:])  # the same image moved by (-2, -3)
    assert torch.allclose(y_shifted[:, :, 1:-1, 1:-1], y[:, :, 3:-1, 4:-1])  # wherever both windows are whole
    small, large = (sasa.count(layer.float(), (6, s, s)).macs for s in (8, 16))
    assert large == 4 * small


def test_qna_flops_match_the_closed_form():
    from sasa.layers.qna import QnA2d

    C, H, W, n, L, k = 8, 5, 4, 2, 3, 5
    d, hw = C // n, H * W
    macs = hw * (
        C * 2 * C + L * n * d + L * n * k * k + L * n * d * k * k + L * C * C
    )  # kv, scores, both sums, projection
    assert sasa.count(QnA2d(C, C, kernel_size=k, heads=n, queries=L), (C, H, W)).macs == macs


def _lesa():
    from sasa.layers.lesa import LESA2d

    torch.manual_seed(0)
    layer = LESA2d(8, 8, heads=2).double().eval()
    for m in layer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # batch norms that do something
            (
                torch.nn.init.uniform_(m.weight, 0.5, 1.5),
                torch.nn.init.normal_(m.bias),
                torch.nn.init.normal_(m.running_mean),
            )
    return layer


def test_lesa_adds_the_gated_binary_term_to_the_unary_convolution():
    layer = _lesa()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    unary, binary = layer.unary(x), layer.binary(x)
    g = layer.gate[1:]  # after the ReLU
    gate = torch.sigmoid(g(torch.relu(torch.cat([unary, binary], 1))))
    assert torch.allclose(layer(x), unary + gate * binary)
    bot = layer.binary[0]
    assert type(bot).__name__ == "BoTAttention2d" and bot.heads == 2  # the binary term: global multi-head attention
    with torch.no_grad():
        layer.gate[-1].bias.fill_(-1e4)  # gate shut: LESA is its unary convolution
    assert torch.allclose(layer(x), unary)


def test_lesa_unary_term_is_a_grouped_convolution():
    """Before the 1x1 mix, output group g reads input group g only, within 3 x 3."""
    layer = _lesa()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    layer.unary[0](x)[0, :4, 3, 3].sum().backward()  # group 0's outputs at one pixel
    reached = x.grad[0].abs() > 0
    assert (
        reached[:4, 2:5, 2:5].all() and not reached[4:].any() and not reached[:, :2].any() and not reached[:, 5:].any()
    )


def test_lesa_flops_are_its_parts():
    from sasa.layers.global_attention import BoTAttention2d
    from sasa.layers.lesa import LESA2d

    C, H, W, n = 16, 5, 4, 2
    hw = H * W
    bot = sasa.count(BoTAttention2d(C, C, heads=n), (C, H, W)).macs
    unary = 9 * C * (C // n) * hw + C * C * hw
    gate = 2 * C * C * hw + C * C * hw
    assert sasa.count(LESA2d(C, C, heads=n), (C, H, W)).macs == bot + unary + gate


def _elsa(**kwargs):
    from sasa.layers.elsa import ELSA2d

    torch.manual_seed(0)
    return ELSA2d(8, 8, **{"kernel_size": 3, "heads": 2, **kwargs}).double()


def test_elsa_filters_each_channel_by_its_heads_hadamard_attention_and_ghost_head():
    """Per pixel: softmax over the 3 x 3 offsets of logits computed from q * k at the pixel (through
    the logit convolutions), times m[c, o], plus g[c, o]; applied to the channel's window of values."""
    layer = _elsa()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    q, k, v = layer.qkv(x).split([layer.qk_channels, layer.qk_channels, 8], 1)
    logits = layer.logits(q * k / 2).view(2, 2, 9, 4, 5)  # head width 4: scale 1/2
    out = torch.zeros(2, 8, 4, 5, dtype=torch.float64)
    vp = F.pad(v, (1, 1, 1, 1))
    for c in range(8):
        a = logits[:, c // 4].softmax(1)  # (B, 9, H, W)
        for o in range(9):
            f = layer.ghost_mul[c, o] * a[:, o] + layer.ghost_add[c, o]
            out[:, c] += f * vp[:, c, o // 3 : o // 3 + 4, o % 3 : o % 3 + 5]
    expected = layer.proj(out)
    y = layer(x)
    assert torch.allclose(y, expected)
    g = torch.randn_like(y)
    params = (x, layer.ghost_mul, layer.ghost_add, layer.qkv.weight)
    assert all(
        torch.allclose(a, b)
        for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g))
    )


def test_elsa_without_ghost_head_shares_one_filter_per_head():
    layer = _elsa(lam=0, gamma=0)
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64)
    filters, _ = layer.filters(x)
    assert torch.allclose(filters[:, :4], filters[:, :1].expand(-1, 4, -1, -1))  # head 0's channels
    assert torch.allclose(filters.sum(2), torch.ones(1, 8, 20, dtype=torch.float64))  # a softmax over the window


def test_elsa_flops_match_the_closed_form():
    from sasa.layers.elsa import ELSA2d

    C, H, W, n, k = 16, 5, 4, 2, 3
    hw, qk = H * W, 16  # q and k: 2/3 of 16 rounded up to groups of 8
    macs = hw * (C * (2 * qk + C) + qk * 8 * k * k + qk * k * k * n + C * k * k + C * C)
    assert sasa.count(ELSA2d(C, C, kernel_size=k, heads=n), (C, H, W)).macs == macs


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "k,stride,shape,ghost",
    [
        (3, 1, (2, 8, 4, 5), {}),
        (5, 2, (1, 8, 9, 7), {}),
        (7, 1, (2, 8, 3, 6), {"lam": 0}),
        (3, 1, (1, 8, 1, 6), {"gamma": 0}),
        (3, 1, (1, 8, 5, 5), {"lam": 2.0, "gamma": 0.5}),
    ],
)
def test_elsa_fast_path_equals_the_reference(dtype, tol, k, stride, shape, ghost):
    """The split filter (aggregation with a per-channel scale + depthwise convolution of the ghost
    addend) against the unfolded per-channel filters, forward and every gradient."""
    from sasa.layers.elsa import ELSA2d

    torch.manual_seed(0)
    fast = ELSA2d(8, 8, stride, kernel_size=k, heads=2, **ghost).to(dtype)
    ref = ELSA2d(8, 8, stride, kernel_size=k, heads=2, impl="reference", **ghost).to(dtype)
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        fast.ghost_mul.abs_()  # lambda = 2 or 0.5 powers stay real
    ref.ghost_mul.data.copy_(fast.ghost_mul)
    x = torch.randn(*shape, dtype=dtype).requires_grad_()
    y, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = torch.randn_like(y)
    leaves, ref_leaves = (x, *fast.parameters()), (x, *ref.parameters())
    grads = torch.autograd.grad(y, leaves, g, allow_unused=True, materialize_grads=True)  # lam = 0 or gamma = 0: zeros
    for a, b in zip(grads, torch.autograd.grad(y_ref, ref_leaves, g, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


def _evolving_pair(alpha):
    from sasa.layers.global_attention import BoTAttention2d

    torch.manual_seed(0)
    first, second = (BoTAttention2d(8, 8, heads=2, evolve=alpha, impl="reference").double() for _ in range(2))
    second.follow(first)
    return first, second


def test_evolving_attention_continues_the_previous_layers_logits_by_a_residual_convolution():
    from sasa.layers.global_attention import relative_global_logits

    first, second = _evolving_pair(0.3)
    x1 = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    x2 = torch.randn(2, 8, 3, 4, dtype=torch.float64)

    def logits(m, x):
        q, k, _ = m.qkv(x).split([8, 8, 8], 1)
        return relative_global_logits(q.view(2, 2, 4, 3, 4), k.view(2, 2, 4, 3, 4), m.rel_row, m.rel_col)

    first(x1)
    y = second(x2)
    evolved = 0.3 * second.evolve_conv(logits(first, x1)) + 0.7 * logits(second, x2)
    v = second.qkv(x2)[:, 16:].view(2, 2, 4, 12)
    expected = torch.einsum("bhnm,bhcm->bhcn", evolved.softmax(-1), v).reshape(2, 8, 3, 4)
    assert torch.allclose(y, expected)
    (grad,) = torch.autograd.grad(y.sum(), first.qkv.weight)  # the first layer's maps reach the second's output
    assert grad.abs().sum() > 0
    assert first._handoff is None  # handed over once, not kept


def test_evolving_attention_off_or_without_a_predecessor_is_plain_attention():
    from sasa.layers.global_attention import BoTAttention2d

    first, second = _evolving_pair(0.5)
    plain = BoTAttention2d(8, 8, heads=2, impl="reference").double()
    plain.load_state_dict({k: v for k, v in second.state_dict().items() if not k.startswith("evolve_conv")})
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    assert torch.allclose(second(x), plain(x))  # the first layer has not run: nothing to evolve from
    first(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    assert torch.allclose(second(x), plain(x))  # maps of another size (a strided block before it)


def test_evolving_attention_links_the_blocks_of_a_resnet_group_and_counts_its_convolution():
    kwargs = dict(
        width=0.125, heads=2, kernel_size=3, small_input=True, num_classes=10, attention_groups=(3,), mixer="bot"
    )
    model = sasa.create_model("resnet26", mixer_args={"evolve": 0.5}, **kwargs)
    mixers = [b.mixer for b in model.layer3]
    assert all(m._previous == (p,) for p, m in zip(mixers, mixers[1:])) and mixers[0]._previous == ()
    plain = sasa.count(sasa.create_model("resnet26", **kwargs), (3, 16, 16)).macs
    n = (16 // 4) ** 2  # group 3 of a small-input network: 4 x 4 maps after its first block
    # of the group's 4 blocks the last two evolve: the first attends at 8 x 8 before its pool, so the
    # second (4 x 4) has no predecessor of its size
    assert sasa.count(model, (3, 16, 16)).macs == plain + 2 * 2 * 2 * 9 * n * n
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert mixers[1].evolve_conv.weight.grad is None and mixers[2].evolve_conv.weight.grad.abs().sum() > 0
