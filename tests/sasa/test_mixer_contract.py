"""The contract every registered mixer keeps, parametrised over the registry: a new mixer is
checked here without a line added. Its fast path computes the same function as its reference,
forward and backward; its FLOPs are counted exactly whatever kernel runs; it fills the ResNet
skeleton, trains a step, and reads channels-last maps. (Each mixer's defining property is tested
in its own file.)"""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sasa
from sasa.__main__ import main as cli
from sasa.layers import MIXER_INFO, MIXERS, create_mixer

WITH_FAST_PATH = [name for name, info in MIXER_INFO.items() if info.impls]
SHAPES = [  # B, C, H, W, stride, channels_last
    (2, 8, 7, 5, 1, False),  # odd sizes: partial blocks, shifted windows at both borders
    (1, 8, 6, 9, 2, False),
    (2, 8, 5, 8, 1, True),
]


def _shared(name, pos_enc="relative"):
    """The network-wide settings at test size; pos_enc reaches only the mixers that take it."""
    return {"kernel_size": 3, "heads": 2} | ({"pos_enc": pos_enc} if "pos_enc" in MIXER_INFO[name].options else {})


def _pair(name, channels, pos_enc, stride, dtype):
    """The mixer's fast and reference paths with the same weights."""
    info = MIXER_INFO[name]
    torch.manual_seed(0)
    fast = create_mixer(
        name, channels, channels, stride, _shared(name, pos_enc) | {"impl": "fast"}, **info.test_options
    )
    reference = create_mixer(
        name, channels, channels, stride, _shared(name, pos_enc) | {"impl": "reference"}, **info.test_options
    )
    fast, reference = fast.to(dtype), reference.to(dtype)
    reference.load_state_dict(fast.state_dict())
    assert {_impls(fast), _impls(reference)} == {("fast",), ("reference",)}
    return fast.train(), reference.train()


def _impls(mixer) -> tuple[str, ...]:
    """The kernels its layers run (a composite mixer such as LESA passes ``impl`` to a part)."""
    return tuple(sorted({m.impl for m in mixer.modules() if hasattr(m, "impl")}))


def _pos_encs(name):
    return ("relative", "none") if "pos_enc" in MIXER_INFO[name].options else ("relative",)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,C,H,W,stride,channels_last", SHAPES)
@pytest.mark.parametrize("name,pos_enc", [(n, p) for n in WITH_FAST_PATH for p in _pos_encs(n)])
def test_fast_path_equals_the_reference(name, pos_enc, B, C, H, W, stride, channels_last, dtype):
    fast, reference = _pair(name, C, pos_enc, stride, dtype)
    x = torch.randn(B, C, H, W, dtype=dtype, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out_fast, out_ref = fast(x), reference(x)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(out_fast, out_ref, **tol)
    grad = torch.randn(out_ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    grads_fast = torch.autograd.grad(out_fast, [x, *fast.parameters()], grad)
    grads_ref = torch.autograd.grad(out_ref, [x, *reference.parameters()], grad)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, **tol)


@pytest.mark.parametrize("name", WITH_FAST_PATH)
def test_flop_counts_do_not_depend_on_the_kernel(name):
    fast, reference = _pair(name, 8, "relative", 1, torch.float64)
    x = torch.randn(1, 8, 7, 5, dtype=torch.float64)
    counts = []
    for module in (fast, reference):
        with FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
    assert _impls(fast) == ("fast",)  # counting switched the kernel back afterwards


@pytest.mark.parametrize("name", [n for n in MIXER_INFO if n != "conv"])
def test_every_mixer_fills_the_resnet_skeleton_trains_and_is_counted(name):
    info = MIXER_INFO[name]
    model = sasa.create_model(
        "resnet26", width=0.125, heads=2, kernel_size=3, small_input=True, num_classes=10, in_chans=1,
        attention_groups=info.groups, mixer=name, mixer_args=info.test_options,
    )  # fmt: skip
    assert model.config["mixer"] == name and model.config["mixer_args"] == info.test_options
    for group in (1, 4):
        expected = info.cls if group in info.groups else MIXERS["conv"]
        assert type(getattr(model, f"layer{group}")[0].mixer) is expected
    model(torch.randn(2, 1, 28, 28)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    conv = sasa.count(
        sasa.create_model("resnet26", width=0.125, small_input=True, num_classes=10, in_chans=1), (1, 28, 28)
    )
    counts = sasa.count(model, (1, 28, 28))
    assert counts.flops == 2 * counts.macs > 0 and counts.params == sum(p.numel() for p in model.parameters())
    assert counts.flops != conv.flops


@pytest.mark.parametrize("name", list(MIXER_INFO))
def test_every_mixer_computes_the_same_on_channels_last_maps(name):
    """The pipeline trains in NHWC (``train.channels_last``): each mixer must read such maps, and
    its output and gradients must not depend on the layout."""
    torch.manual_seed(0)
    layer = create_mixer(name, 16, 16, 2, {"kernel_size": 3, "heads": 2}, **MIXER_INFO[name].test_options).double()
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    outputs, grads = [], []
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer.zero_grad()
        xi = x.clone().contiguous(memory_format=fmt).requires_grad_()
        out = layer.to(memory_format=fmt)(xi)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        outputs.append(out)
        grads.append([xi.grad] + [p.grad.contiguous() for p in layer.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0])
    for g_last, g_contiguous in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_last, g_contiguous)


@pytest.mark.parametrize("name", [n for n in MIXER_INFO if n != "conv"])
def test_the_cli_counts_every_mixer(name, capsys):
    args = ["info", "--model", "resnet26", "--form", "conv_stem_attention", "--mixer", name, "--small-input"]
    args += ["--width", "0.25", "--heads", "2", "--kernel-size", "3", "--resolution", "16", "--json"]
    args += [f"--mixer-arg={key}={json.dumps(value)}" for key, value in MIXER_INFO[name].test_options.items()]
    assert cli(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mixer"] == name and result["mixer_args"] == MIXER_INFO[name].test_options
    assert result["flops"] == 2 * result["macs"] > 0
