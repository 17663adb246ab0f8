"""Every mixer's fast path computes the same function as its readable reference, forward and
backward, and the two ops under them agree with their own references: blocked attention (halo,
neighbourhood, BoT, AA) and the footprint aggregation of SAN. FLOP counts do not depend on the
kernel that runs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import saved_bytes
from sasa.counting import counting_flops
from sasa.layers import MIXER_INFO, create_mixer
from sasa.layers.stem import StemAttention2d
from sasa.ops import cpu_extension
from sasa.ops.blocked_attention import blocked_attention, reference_blocked_attention
from sasa.ops.footprint_aggregate import footprint_aggregate, reference_footprint_aggregate

D = torch.float64


@pytest.fixture(params=["cpp", "fallback"])
def kernel(request, monkeypatch):
    """The C++ CPU kernels, and what runs without them: the SDPA formulation of blocked attention
    (which GPUs run too) and the reference footprint aggregation."""
    if request.param == "fallback":
        monkeypatch.setattr(cpu_extension, "load", lambda: None)
    elif cpu_extension.load() is None:
        pytest.skip("no C++ compiler here")
    return request.param


def _blocked_inputs(B=2, heads=2, d=3, dv=5, H=5, W=7, seed=0, channels_last=False):
    """Maps with a padding query in every block, masked keys, and S = 9 (no multiple of a vector)."""
    g = torch.Generator().manual_seed(seed)
    P = H * W
    if channels_last:  # pixels outermost, as a channels-last qkv projection lays them out
        q, k = (torch.randn(B, heads, P, d, generator=g, dtype=D).transpose(2, 3).requires_grad_() for _ in range(2))
    else:
        q, k = (torch.randn(B, heads, d, P, generator=g, dtype=D, requires_grad=True) for _ in range(2))
    v = torch.randn(B, heads, dv, P, generator=g, dtype=D, requires_grad=True)
    blocks = min(4, P // 8)
    perm = torch.randperm(P, generator=g)
    queries = torch.cat([perm[: blocks * 8].view(blocks, 8), torch.full((blocks, 1), -1)], dim=1)  # L = 9
    keys = torch.randint(0, P, (blocks, 9), generator=g)  # Sr = 3, Sc = 3
    row = torch.randn(B * heads * blocks, 9, 3, generator=g, dtype=D)
    row[..., 0] = float("-inf")  # every query's first key row is masked
    col = torch.randn(B * heads * blocks, 9, 3, generator=g, dtype=D, requires_grad=True)
    return q, k, v, queries, keys, row.requires_grad_(), col


@pytest.mark.parametrize("channels_last", [False, True])
def test_blocked_attention_equals_reference(kernel, channels_last):
    q, k, v, queries, keys, row, col = inputs = _blocked_inputs(channels_last=channels_last)
    leaves = [q, k, v, row, col]
    ref, fast = reference_blocked_attention(*inputs), blocked_attention(*inputs)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ref.shape, dtype=D, generator=torch.Generator().manual_seed(1))
    for g_fast, g_ref in zip(torch.autograd.grad(fast, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
    assert ref[..., queries[queries >= 0]].abs().sum() > 0
    unused = torch.ones(q.shape[-1], dtype=torch.bool)
    unused[queries[queries >= 0]] = False
    assert (fast[..., unused] == 0).all()  # pixels no block queries stay zero


def test_blocked_attention_kernel_passes_gradcheck(kernel):
    q, k, v, queries, keys, row, col = _blocked_inputs(B=1, heads=1, d=2, dv=2, H=3, W=4)
    row = row.detach().clamp(min=-5).requires_grad_()  # gradcheck perturbs every entry: no -inf here
    assert torch.autograd.gradcheck(
        lambda q, k, v, r, c: blocked_attention(q, k, v, queries, keys, r, c), (q, k, v, row, col)
    )


def test_blocked_attention_rejects_bad_index_tables():
    if cpu_extension.load() is None:
        pytest.skip("no C++ compiler here")
    q, k, v, queries, keys, row, col = _blocked_inputs()
    with pytest.raises(RuntimeError, match="pixel indices"):
        blocked_attention(q, k, v, queries, keys + q.shape[-1], row, col)
    with pytest.raises(RuntimeError, match="factorise"):
        blocked_attention(q, k, v, queries, keys, row[..., :2], col)


@pytest.mark.parametrize(
    "scaled,biased", [(False, False), (True, True), (True, False), (False, True)], ids=["san", "elsa", "scale", "bias"]
)
@pytest.mark.parametrize("B,G,share,H,W,k", [(2, 3, 2, 5, 7, 3), (1, 2, 1, 4, 3, 5), (1, 1, 3, 6, 9, 1)])
def test_footprint_aggregate_equals_reference(kernel, B, G, share, H, W, k, scaled, biased):
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(B, G, k * k, H, W, generator=g, dtype=D, requires_grad=True)
    values = torch.randn(B, W, H, G * share, generator=g, dtype=D).permute(0, 3, 2, 1).requires_grad_()  # any strides
    scale, bias = (
        torch.randn(G * share, k * k, generator=g, dtype=D, requires_grad=True) if on else None
        for on in (scaled, biased)
    )
    leaves = [t for t in (attn, values, scale, bias) if t is not None]
    ref, fast = (
        reference_footprint_aggregate(attn, values, k, scale, bias),
        footprint_aggregate(attn, values, k, scale, bias),
    )
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ref.shape, dtype=D, generator=g)
    for g_fast, g_ref in zip(torch.autograd.grad(fast, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
    small = [attn[:1, :1, :, :3, :3], values[:1, :share, :3, :3]] + [t[:share] for t in (scale, bias) if t is not None]
    small = [t.detach().requires_grad_() for t in small]

    def op(a, v, *per_channel):
        it = iter(per_channel)
        return footprint_aggregate(a, v, k, next(it) if scaled else None, next(it) if biased else None)

    assert torch.autograd.gradcheck(op, small)


# --- the fast mixers' own properties (fast = reference for every mixer: test_mixer_contract.py) ---


def _pair(name, channels, pos_enc, stride, dtype, options=None):
    """A mixer's fast and reference paths with the same weights (own options: the registry's test options)."""
    torch.manual_seed(0)
    shared = {"heads": 2, "kernel_size": 3} | ({"pos_enc": pos_enc} if "pos_enc" in MIXER_INFO[name].options else {})
    options = MIXER_INFO[name].test_options if options is None else options
    fast = create_mixer(name, channels, channels, stride, shared=shared, **options).to(dtype)
    reference = create_mixer(name, channels, channels, stride, shared=shared | {"impl": "reference"}, **options).to(
        dtype
    )
    reference.load_state_dict(fast.state_dict())
    return fast.train(), reference.train()


@pytest.mark.parametrize("name", ["halo", "neighborhood", "bot"])
def test_fast_mixer_on_the_sdpa_path_equals_reference(name, monkeypatch):
    """The formulation GPUs run (and CPUs without a compiler), checked here on the CPU."""
    monkeypatch.setattr(cpu_extension, "load", lambda: None)
    fast, reference = _pair(name, 8, "relative", 1, D)
    x = torch.randn(2, 8, 7, 5, dtype=D, requires_grad=True)
    torch.testing.assert_close(fast(x), reference(x))
    torch.testing.assert_close(torch.autograd.grad(fast(x).sum(), x)[0], torch.autograd.grad(reference(x).sum(), x)[0])


@pytest.mark.parametrize("name", ["halo", "neighborhood", "bot", "aa"])
def test_fast_attention_keeps_no_logits_for_the_backward_pass(name):
    """At a ResNet group-2 shape the fast paths keep at most half of what the references keep
    (which store the queries x keys logits or the gathered windows; each storage counted once)."""
    options = {"kernel_size": 7} if name == "neighborhood" else {}
    fast, reference = _pair(name, 64, "relative", 1, torch.float32, options)
    x = torch.randn(2, 64, 28, 28, requires_grad=True)
    assert saved_bytes(fast, x) * 2 <= saved_bytes(reference, x)


@pytest.mark.parametrize("name", ["san_pairwise", "san_patchwise"])
def test_fast_san_keeps_no_unfolded_values(name):
    """SAN's fast aggregation keeps the values once instead of the reference's k^2-times copy
    (SAN's MLP inputs, one per (pixel, footprint position), are kept by both)."""
    fast, reference = _pair(name, 64, "relative", 1, torch.float32, {"kernel_size": 7})
    x = torch.randn(2, 64, 28, 28, requires_grad=True)
    values = 2 * 64 * 28 * 28 * 4
    assert saved_bytes(reference, x) - saved_bytes(fast, x) >= (49 - 1) * values


def test_counting_flops_is_seen_only_inside_the_counter():
    assert not counting_flops()
    with FlopCounterMode(display=False):
        assert counting_flops()
    assert not counting_flops()


def test_sasa_is_counted_by_its_op_on_the_flexattention_device(monkeypatch):
    """On CUDA the fast path is FlexAttention, which the counter would score as dense attention over
    every pixel (about 128x SASA's FLOPs at 56 x 56); while counting, the op runs on every device.
    Here the CPU plays the FlexAttention device, with a stand-in that records its calls."""
    import sasa
    from sasa.layers import SASA2d
    from sasa.ops import local_attention as local_attention_module

    layer = SASA2d(16, 16, kernel_size=3, heads=2)
    expected = sasa.count(layer, (16, 8, 8))
    calls = []
    monkeypatch.setattr(local_attention_module, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(
        local_attention_module, "flex_local_attention", lambda q, *rest: calls.append(q.shape) or torch.zeros_like(q)
    )
    assert sasa.count(layer, (16, 8, 8)) == expected and not calls
    layer(torch.randn(1, 16, 8, 8))
    assert calls  # outside the counter the device's own fast path runs


@pytest.mark.parametrize("values", ["spatially_aware", "plain", "conv"])
@pytest.mark.parametrize("pos_enc", ["relative", "none"])
def test_fast_attention_stem_equals_reference(values, pos_enc):
    """The paper's stem is halo blocks without a halo: 4 x 4 tiles, partial at the borders here."""
    torch.manual_seed(0)
    fast = StemAttention2d(3, 16, heads=4, pos_enc=pos_enc, values=values).double()
    reference = StemAttention2d(3, 16, heads=4, pos_enc=pos_enc, values=values, impl="reference").double()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 7, 9, dtype=D, requires_grad=True)
    torch.testing.assert_close(fast(x), reference(x))
    grad = torch.randn(2, 16, 7, 9, dtype=D)
    for g_fast, g_ref in zip(
        torch.autograd.grad(fast(x), [x, *fast.parameters()], grad),
        torch.autograd.grad(reference(x), [x, *reference.parameters()], grad),
    ):
        torch.testing.assert_close(g_fast, g_ref)
