"""The transformer families beside the ResNets: counted exactly (ViT's closed form; fused attention
counted as its math path); CvT's convolutions and the ST-MoE layer against slow references and
hand-computed values. (From params files and in the pipeline: tests/pipeline/test_transformer_families.py.)"""

import math

import pytest
import torch

import sasa
from sasa.layers.moe import MoEMlp, aux_loss, reference_moe_mlp
from sasa.models.cvt import ConvEmbedding, ConvProjection, reference_conv_embedding, reference_conv_projection


def _vit_closed_form(img, patch, dim, depth, classes, chans):
    """ViT's multiply-adds and parameters: patch embedding, per block qkv, q.k, attention x v,
    projection and a 4x MLP over N = patches + 1 tokens, the head on the class token."""
    n = (img // patch) ** 2 + 1
    macs = (n - 1) * dim * chans * patch**2 + depth * (12 * n * dim**2 + 2 * n**2 * dim) + dim * classes
    params = (
        chans * patch**2 * dim
        + dim
        + dim
        + n * dim
        + depth * (12 * dim**2 + 13 * dim)
        + 2 * dim
        + dim * classes
        + classes
    )
    return macs, params


@pytest.mark.parametrize(
    "img,patch,dim,depth,heads,classes,chans", [(32, 4, 64, 4, 4, 10, 1), (224, 16, 192, 12, 3, 1000, 3)]
)
def test_vit_counts_match_the_closed_form(img, patch, dim, depth, heads, classes, chans):
    model = sasa.create_model(
        "timm:vit_tiny_patch16_224",
        num_classes=classes,
        in_chans=chans,
        img_size=img,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
    )
    macs, params = _vit_closed_form(img, patch, dim, depth, classes, chans)
    counts = sasa.count(model, (chans, img, img))
    assert (counts.macs, counts.params, counts.flops) == (macs, params, 2 * macs)


def test_cvt13_has_the_papers_size():
    counts = sasa.count(sasa.create_model("cvt13"), 224)
    assert counts.params == pytest.approx(20e6, rel=0.02)  # the paper: 20 M
    assert counts.macs == pytest.approx(4.5e9, rel=0.02)  # the paper's 4.5 G FLOPs are multiply-adds


def test_cvt_token_embedding_equals_its_patchwise_reference_forward_and_backward():
    torch.manual_seed(0)
    embed = ConvEmbedding(3, 8, kernel_size=7, stride=4).double()
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64, requires_grad=True)
    fast, ref = embed(x), reference_conv_embedding(embed, x)
    assert fast.shape == ref.shape == (2, 8, 4, 3) and torch.allclose(fast, ref)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (x, embed.proj.weight), g)
    grads_ref = torch.autograd.grad(ref, (x, embed.proj.weight), g)
    assert all(torch.allclose(a, b) for a, b in zip(grads_fast, grads_ref))


@pytest.mark.parametrize("stride", [1, 2])
def test_cvt_convolutional_projection_equals_its_tokenwise_reference(stride):
    torch.manual_seed(0)
    proj = ConvProjection(6, stride).double().eval()
    proj.norm.running_mean.uniform_(-1, 1)
    proj.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    fast, ref = proj(x), reference_conv_projection(proj, x)
    assert fast.shape == ref.shape == (2, math.ceil(7 / stride) * math.ceil(5 / stride), 6) and torch.allclose(
        fast, ref
    )
    g = torch.randn_like(fast)
    assert torch.allclose(torch.autograd.grad(fast, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_cvt_attention_reads_a_quarter_of_the_keys_with_kv_stride_2():
    torch.manual_seed(0)
    model = sasa.create_model(
        "cvt13", depths=(1,), dims=(8,), heads=(2,), embed_kernels=(3,), embed_strides=(1,), num_classes=3
    )
    seen = []
    model.stages[0].blocks[0].attn.k.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model(torch.randn(1, 3, 8, 8))
    assert seen == [16]  # 4 x 4 of the 8 x 8 tokens (the class token joins after the projection)


def _moe(**kwargs):
    torch.manual_seed(0)
    return MoEMlp(6, 10, **{"num_experts": 4, "top_k": 2, **kwargs}).double()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_routes_each_token_to_its_top_k_experts_and_equals_the_reference(top_k):
    layer = _moe(top_k=top_k, capacity_factor=4.0)  # room for every choice: nothing dropped
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    gates, experts, kept, _ = layer.route(x.reshape(-1, 6))
    probs = layer.router(x.reshape(-1, 6)).softmax(-1)
    assert kept.all() and float(layer.dropped_fraction) == 0
    assert torch.equal(experts, probs.topk(top_k, -1).indices)
    assert torch.allclose(gates.sum(-1), torch.ones(15, dtype=gates.dtype))
    y, ref = layer(x), reference_moe_mlp(layer, x)
    assert torch.allclose(y, ref)
    g = torch.randn_like(y)
    params = (x, layer.w1, layer.w2, layer.router.weight)
    assert all(
        torch.allclose(a, b) for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g))
    )


def test_moe_drops_choices_over_capacity_first_choices_first():
    """Six tokens all prefer expert 0, then expert 1; each expert takes ceil(2/3 * 6 * 2 / 4) = 2.
    Expert 0 keeps tokens 0 and 1 (first choices, in token order); second choices queue after every
    first choice, and expert 1 had none, so it keeps tokens 0 and 1 too; tokens 2-5 are dropped."""
    layer = _moe(num_experts=4, top_k=2, capacity_factor=2 / 3)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 2.0, 1.0
    x = torch.zeros(6, 6, dtype=torch.float64)
    x[:, 0] = 1.0
    gates, experts, kept, _ = layer.route(x)
    assert layer.capacity(6) == 2
    assert experts.tolist() == [[0, 1]] * 6
    assert kept.tolist() == [[True, True], [True, True]] + [[False, False]] * 4
    assert float(layer.dropped_fraction) == pytest.approx(8 / 12)
    y = layer(x)
    assert torch.equal(y[2:], torch.zeros_like(y[2:]))  # dropped tokens get nothing (the residual carries them)
    assert torch.allclose(y, reference_moe_mlp(layer, x))


def test_moe_auxiliary_losses_match_hand_computed_values():
    """Two experts, three tokens with router logits (ln 3, 0), (0, ln 3), (0, 0)."""
    layer = _moe(num_experts=2, top_k=1, capacity_factor=2.0)
    with torch.no_grad():
        layer.router.weight.copy_(
            torch.tensor([[math.log(3), 0, 0, 0, 0, 0], [0, math.log(3), 0, 0, 0, 0]], dtype=torch.float64)
        )
    x = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    layer(x)
    # probabilities: (3/4, 1/4), (1/4, 3/4), (1/2, 1/2); first choices: 0, 1, 0 (a tie goes to the lower index)
    f = [2 / 3, 1 / 3]
    p = [(3 / 4 + 1 / 4 + 1 / 2) / 3, (1 / 4 + 3 / 4 + 1 / 2) / 3]
    assert float(layer.aux_losses["load_balance"]) == pytest.approx(2 * (f[0] * p[0] + f[1] * p[1]))
    lse = [math.log(3 + 1), math.log(1 + 3), math.log(2)]
    assert float(layer.aux_losses["router_z"]) == pytest.approx(sum(v * v for v in lse) / 3)
    total, parts = aux_loss(torch.nn.Sequential(layer))
    assert float(total) == pytest.approx(1e-2 * float(parts["load_balance"]) + 1e-3 * float(parts["router_z"]))


def test_moe_is_the_mlp_of_a_timm_vit_and_its_options_are_checked():
    model = sasa.create_model(
        "timm:vit_tiny_patch16_224",
        num_classes=10,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        moe={"num_experts": 3, "top_k": 1},
    )
    assert [type(b.mlp) for b in model.blocks] == [MoEMlp, MoEMlp]
    model(torch.randn(2, 3, 16, 16))
    total, parts = aux_loss(model)
    assert total is not None and set(parts) == {"load_balance", "router_z", "dropped_fraction"}
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=3"):
        sasa.create_model("timm:vit_tiny_patch16_224", moe={"num_experts": 3, "top_k": 5})
    with pytest.raises(ValueError, match="unexpected keyword argument 'experts'"):
        sasa.create_model("timm:vit_tiny_patch16_224", moe={"experts": 3})
