"""The ResNets: the paper's parameter and FLOP counts, torchvision's ResNet-50, forms and errors."""

import pytest
import torch
import torchvision

import sasa
from sasa.layers import SASA2d
from sasa.models import from_torchvision_state_dict
from sasa.paper import TABLE1, TABLE3, TABLE4


def _rel(ours, paper):
    return abs(ours - paper) / paper


def _check_against_paper(rows, params_tol, flops_tol):
    """rows: (label, Counts, paper GFLOPs, paper M params); prints every row's relative differences.
    The paper rounds to 0.1 G / 0.1 M (<= 1.1% / 0.5%). Each tolerance is just above what our
    counts reach (the test docstrings): an attention formula without the weighted sum of the values
    fails every table (checked: Table 1's attention rows then reach -4.4% .. -5.7%, Table 4 -10.3%
    at k = 11, Table 3 -5.4%)."""
    print(f"\n{'row':<34} {'params M':>9} {'paper':>6} {'rel':>7} {'GFLOPs':>7} {'paper':>6} {'rel':>7}")
    for label, c, gflops, mparams in rows:
        p, f = c.params / 1e6, c.flops / 1e9
        print(
            f"{label:<34} {p:9.3f} {mparams:6.1f} {(p - mparams) / mparams:+7.4f} "
            f"{f:7.3f} {gflops:6.1f} {(f - gflops) / gflops:+7.4f}"
        )
    for label, c, gflops, mparams in rows:
        assert _rel(c.params / 1e6, mparams) <= params_tol, (label, c)
        assert _rel(c.flops / 1e9, gflops) <= flops_tol(label), (label, c)


def test_table1_params_and_flops_match_the_paper():
    """Measured (ours - paper) / paper: params -0.17% .. +0.64% (ResNet-38 conv stem + attention);
    GFLOPs of the conv ResNets -0.26% .. -1.05% (ResNet-38), of the attention ones -1.81% .. -3.16%
    (ResNet-38 full attention): ours are consistently below the paper's."""
    rows = []
    for (name, form), (gflops, mparams, _) in TABLE1.items():
        rows.append((f"{name} {form}", sasa.count(sasa.create_model(name, form=form), 224), gflops, mparams))
    _check_against_paper(rows, 0.007, lambda label: 0.011 if label.endswith(" conv") else 0.033)


def test_table3_and_table4_counts_match_the_paper():
    """Measured (ours - paper) / paper. Table 4 (k = 3..11): params +0.13% .. +0.30%, GFLOPs -1.26% ..
    -4.28% (k = 11; the paper's FLOPs grow faster with k than ours). Table 3: params -0.17% .. +0.38%,
    GFLOPs -0.26% .. -2.77% (attention in every group)."""
    table4 = [
        (
            f"resnet50 k={k}",
            sasa.count(sasa.create_model("resnet50", form="conv_stem_attention", kernel_size=k), 224),
            gflops,
            mparams,
        )
        for k, (gflops, mparams, _) in TABLE4.items()
    ]
    _check_against_paper(table4, 0.0035, lambda label: 0.044)
    table3 = [
        (
            f"resnet50 groups={groups}",
            sasa.count(sasa.create_model("resnet50", form="conv_stem_attention", attention_groups=groups), 224),
            gflops,
            mparams,
        )
        for groups, (gflops, mparams, _) in TABLE3.items()
    ]
    _check_against_paper(table3, 0.004, lambda label: 0.028)


def test_conv_resnet50_is_torchvisions_resnet50():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    ours = sasa.create_model("resnet50", form="conv").eval()
    ours.load_state_dict(from_torchvision_state_dict(reference.state_dict()), strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == 25_557_032
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
    assert sasa.count(ours, 224).macs == sasa.count(reference, 224).macs


@pytest.mark.parametrize("form", list(sasa.FORMS))
@pytest.mark.parametrize("name", ["resnet26", "resnet38", "resnet50"])
def test_every_form_trains_one_step_on_small_inputs(name, form):
    model = sasa.create_model(name, form=form, width=0.25, heads=2, num_classes=10, in_chans=1, small_input=True)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("groups", [(1,), (2, 3, 4), (4,), ()])
def test_attention_goes_exactly_where_asked(groups):
    model = sasa.create_model("resnet26", form="conv_stem_attention", attention_groups=groups, width=0.25, heads=2)
    for g in (1, 2, 3, 4):
        mixers = [block.mixer for block in getattr(model, f"layer{g}")]
        assert all(isinstance(m, SASA2d) == (g in groups) for m in mixers)


def test_form_sets_the_stem_and_groups():
    assert isinstance(sasa.create_model("resnet26", form="full_attention").stem.attn, sasa.StemAttention2d)
    assert sasa.create_model("resnet26", form="conv_stem_attention").config["stem"] == "conv"
    assert sasa.create_model("resnet26", form="conv", stem="attention").config["stem"] == "attention"


def test_count_sees_attention_with_either_kernel_and_an_exact_layer_formula():
    layer = SASA2d(16, 32, kernel_size=5, heads=4)
    H = W = 10
    qkv = 3 * 16 * 32 * H * W
    attention = 2 * 5 * 5 * 32 * H * W  # logits and weighted sum
    relative = 2 * 5 * (32 // 2) * H * W  # factorised row and column terms
    expected = qkv + attention + relative
    assert sasa.count(layer, (16, H, W)).macs == expected
    layer.impl = "reference"
    assert sasa.count(layer, (16, H, W)).macs == expected and layer.impl == "reference"


BAD = [
    (dict(name="resnet51"), "model"),
    (dict(form="hybrid"), "form"),
    (dict(stem="patchify"), "stem"),
    (dict(pos_enc="rotary"), "pos_enc"),
    (dict(attention_groups=(0, 2)), "attention_groups"),
    (dict(attention_groups=(5,)), "attention_groups"),
    (dict(kernel_size=6), "kernel_size"),
    (dict(form="full_attention", heads=7), "out_channels"),
    (dict(width=0), "width"),
    (dict(num_classes=0), "num_classes"),
]


@pytest.mark.parametrize("kwargs,name", BAD)
def test_bad_model_arguments(kwargs, name):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=name):
        sasa.create_model(kwargs.pop("name", "resnet26"), **kwargs)


@pytest.mark.parametrize("small_input,size", [(False, 31), (True, 7)])
def test_input_too_small_for_the_network(small_input, size):
    model = sasa.create_model("resnet26", width=0.25, small_input=small_input)
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, size, size))
    with pytest.raises(ValueError, match="too small"):
        sasa.count(model, size)


def test_wrong_input_channels():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        sasa.create_model("resnet26", in_chans=1, width=0.25)(torch.randn(1, 3, 64, 64))


def test_importing_sasa_imports_no_optional_heavy_library():
    """`import sasa` (every CLI call, every benchmark case's fresh process) pays for torch only:
    timm (with torchvision and torch._dynamo) comes with the first timm layer built, FlexAttention
    with the first GPU call. Building an SE block then imports timm."""
    import subprocess
    import sys

    from tests.helpers import REPO

    code = (
        "import sys, sasa; heavy = ('timm', 'torchvision', 'torch._dynamo', 'torch.nn.attention.flex_attention'); "
        "print([m for m in heavy if m in sys.modules]); "
        "sasa.create_model('resnet26', block_attention='se', width=0.25); print('timm' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.split("\n")[:2] == ["[]", "True"], out
