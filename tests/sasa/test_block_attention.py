"""Block attention modules (SE, ECA, CBAM, GC): each one's defining formula written out, its exact
FLOPs against a closed form, and the ResNet-50 sizes beside the papers'."""

import math

import pytest
import torch
import torch.nn.functional as F

import sasa
from sasa.layers.block_attention import create_block_attention

C, H, W = 64, 5, 6


def _x():
    torch.manual_seed(0)
    return torch.randn(2, C, H, W, dtype=torch.float64)


def _module(name):
    torch.manual_seed(1)
    m = create_block_attention(name, C).double().eval()
    for p in m.parameters():  # no zero-initialised layer: every term shows
        torch.nn.init.normal_(p, std=0.3)
    return m


def test_se_gates_channels_by_an_mlp_of_their_means():
    m, x = _module("se"), _x()
    hidden = F.relu(x.mean((2, 3)) @ m.fc1.weight[:, :, 0, 0].t() + m.fc1.bias)
    gates = torch.sigmoid(hidden @ m.fc2.weight[:, :, 0, 0].t() + m.fc2.bias)
    assert m.fc1.out_channels == C // 16
    assert torch.allclose(m(x), x * gates[:, :, None, None])


@pytest.mark.parametrize("channels,k", [(64, 3), (256, 5), (2048, 7)])
def test_eca_kernel_grows_with_log_channels(channels, k):
    assert create_block_attention("eca", channels).conv.kernel_size == (k,)


def test_eca_gates_channels_by_a_1d_convolution_of_their_means():
    m, x = _module("eca"), _x()
    w = m.conv.weight[0, 0]  # (k,)
    k = w.numel()
    means = F.pad(x.mean((2, 3)), (k // 2, k // 2))
    logits = torch.stack([(means[:, c : c + k] * w).sum(-1) for c in range(C)], 1)
    assert torch.allclose(m(x), x * torch.sigmoid(logits)[:, :, None, None])


def test_cbam_gates_channels_then_pixels():
    m, x = _module("cbam"), _x()
    ca, sa = m.channel, m.spatial
    mlp = lambda v: F.relu(v @ ca.fc1.weight[:, :, 0, 0].t()) @ ca.fc2.weight[:, :, 0, 0].t()  # noqa: E731
    y = x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    maps = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
    conv = F.conv2d(maps, sa.conv.conv.weight, padding=3)
    bn = sa.conv.bn
    spatial = (conv - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var + bn.eps)[
        None, :, None, None
    ] * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    assert torch.allclose(m(x), y * torch.sigmoid(spatial))


def test_gc_adds_one_attention_pooled_context_to_every_pixel_and_starts_as_identity():
    x = _x()
    fresh = create_block_attention("gc", C).double()
    assert torch.equal(fresh(x), x)  # the transform's last layer starts at zero
    m = _module("gc")
    weights = torch.softmax(
        (torch.einsum("bchw,c->bhw", x, m.conv_attn.weight[0, :, 0, 0]) + m.conv_attn.bias).flatten(1), -1
    )
    context = torch.einsum("bcp,bp->bc", x.flatten(2), weights)
    mlp = m.mlp_add
    h = context @ mlp.fc1.weight[:, :, 0, 0].t() + mlp.fc1.bias
    h = F.relu(F.layer_norm(h, (h.shape[1],), mlp.norm.weight, mlp.norm.bias, mlp.norm.eps))
    assert torch.allclose(m(x), x + (h @ mlp.fc2.weight[:, :, 0, 0].t() + mlp.fc2.bias)[:, :, None, None])


@pytest.mark.parametrize(
    "name,macs",
    [
        ("se", 2 * C * (C // 16)),
        ("eca", C * 3),
        ("cbam", 2 * 2 * C * (C // 16) + 2 * 49 * H * W),
        ("gc", C * H * W + C * H * W + 2 * C * (C // 16)),  # attention logits, the weighted sum, the transform
    ],
)
def test_block_attention_flops_match_the_closed_form(name, macs):
    assert sasa.count(create_block_attention(name, C), (C, H, W)).macs == macs


@pytest.mark.parametrize("name,paper_params", [("se", 28.1e6), ("cbam", 28.09e6)])
def test_resnet50_with_a_block_attention_has_the_papers_size(name, paper_params):
    conv = sasa.count(sasa.create_model("resnet50"), 224)
    counts = sasa.count(sasa.create_model("resnet50", block_attention=name), 224)
    assert counts.params == pytest.approx(paper_params, rel=0.002)
    assert 0 < counts.macs - conv.macs < 0.01 * conv.macs  # the papers: 3.86 -> 3.87 G


def test_block_attention_is_checked_and_trains_in_a_resnet26_step():
    with pytest.raises(ValueError, match="block_attention='sk' is not supported; allowed: 'se', 'eca', 'cbam', 'gc'"):
        sasa.create_model("resnet26", block_attention="sk")
    model = sasa.create_model(
        "resnet26",
        form="full_attention",
        block_attention="cbam",
        width=0.125,
        heads=2,
        kernel_size=3,
        small_input=True,
        num_classes=10,
    )
    assert model.config["block_attention"] == "cbam" and sasa.create_model("resnet26").config["block_attention"] is None
    loss = F.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([1, 2]))
    loss.backward()
    assert math.isfinite(loss.item()) and model.layer1[0].attention.channel.fc1.weight.grad.abs().sum() > 0
