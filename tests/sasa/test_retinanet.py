"""RetinaNet over the ResNets (Table 2): the conv detector is torchvision's, each backbone form with
conv or attention FPN and heads builds, trains a step and is counted exactly, the attention FPN and
heads compute what their reference does, and the all-attention detector's size against the abstract."""

import json

import pytest
import torch
import torchvision

import sasa
from sasa.__main__ import main as cli
from sasa.layers import MIXERS
from sasa.paper import DETECTION_RATIOS

SMALL = dict(width=0.125, heads=2, kernel_size=3, fpn_channels=32, image_size=64, anchor_sizes=(8, 16, 32, 64, 128))


def _targets(n):
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(n):
        xy = torch.randint(0, 40, (2, 2), generator=g).float()
        boxes = torch.cat([xy, xy + torch.randint(8, 24, (2, 2), generator=g)], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 10, (2,), generator=g)})
    return targets


@pytest.mark.slow
def test_the_conv_detector_is_torchvisions_retinanet_resnet50_fpn():
    ours = sasa.create_model("retinanet_resnet50")
    theirs = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=640, max_size=640
    )
    for part in ("backbone.body", "backbone.fpn", "head"):
        mine = [p.shape for n, p in ours.named_parameters() if n.startswith(part)]
        assert sorted(mine) == sorted(p.shape for n, p in theirs.named_parameters() if n.startswith(part)), part
    assert sasa.count(ours, 640) == sasa.count(theirs, 640)


@pytest.mark.parametrize("head_mixer", ["conv", "sasa"])
@pytest.mark.parametrize("form", ["conv", "conv_stem_attention", "full_attention"])
def test_each_table2_detector_trains_a_step_and_is_counted(form, head_mixer):
    torch.manual_seed(0)
    model = sasa.create_model("retinanet_resnet26", form=form, head_mixer=head_mixer, num_classes=10, **SMALL)
    mixers = [m for m in model.modules() if isinstance(m, MIXERS["sasa"])]
    in_backbone = [m for m in model.backbone.body.modules() if isinstance(m, MIXERS["sasa"])]
    # FPN outputs P3-P5, P6, P7, and four per head tower; the predictors stay convolutions
    assert len(mixers) - len(in_backbone) == (13 if head_mixer == "sasa" else 0)
    assert len(in_backbone) == (0 if form == "conv" else 8)
    assert isinstance(model.head.classification_head.cls_logits, torch.nn.Conv2d)
    losses = model([torch.rand(3, 64, 64) for _ in range(2)], _targets(2))
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.layer4[0].mixer.qkv.weight.grad.abs().sum() > 0 if form != "conv" else True
    tower = model.head.classification_head.conv[0][0]
    assert tower.qkv.weight.grad.abs().sum() > 0 if head_mixer == "sasa" else tower.weight.grad.abs().sum() > 0
    counts = sasa.count(model, 64)
    assert counts.params == sum(p.numel() for p in model.parameters()) and counts.flops == 2 * counts.macs > 0
    assert model.config["head_mixer"] == head_mixer and model.config["form"] == form


def test_the_attention_fpn_and_heads_equal_their_reference_forward_and_backward():
    detectors = []
    for impl in ("fast", "reference"):
        torch.manual_seed(0)
        detectors.append(sasa.create_model("retinanet_resnet26", head_mixer="sasa", impl=impl, **SMALL).double())
    fast, reference = detectors
    reference.load_state_dict(fast.state_dict())
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    outputs = []
    for model in (fast, reference):
        model.eval()
        features = list(model.backbone(x).values())
        logits = model.head(features)
        outputs.append(logits)
        sum((v * v).sum() for v in logits.values()).backward()
    for key in outputs[0]:
        torch.testing.assert_close(outputs[0][key], outputs[1][key])
    for (name, p_fast), p_ref in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, msg=name)


@pytest.mark.slow
def test_the_all_attention_detector_against_the_abstracts_ratios():
    """At 640 x 640 (FLOPs = 2 x multiply-adds of backbone, FPN and heads): 0.63x the parameters and
    0.66x the FLOPs of the conv RetinaNet, against the abstract's 0.66x and 0.61x."""
    conv = sasa.count(sasa.create_model("retinanet_resnet50"), 640)
    attention = sasa.count(sasa.create_model("retinanet_resnet50", form="full_attention", head_mixer="sasa"), 640)
    assert attention.params / conv.params == pytest.approx(DETECTION_RATIOS["params"], abs=0.04)
    assert attention.flops / conv.flops == pytest.approx(DETECTION_RATIOS["flops"], abs=0.06)


def test_the_cli_counts_a_detector(capsys):
    args = ["info", "--model", "retinanet_resnet26", "--resolution", "64", "--json"]
    args += [f"--model-arg={k}={json.dumps(v)}" for k, v in {**SMALL, "head_mixer": "sasa"}.items()]
    assert cli(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["head_mixer"] == "sasa" and result["image_size"] == 64 and result["flops"] == 2 * result["macs"] > 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"head_mixer": "axial"}, "head_mixer='axial' is not supported; allowed: 'conv', 'sasa'"),
        ({"anchor_sizes": (32, 64)}, "anchor_sizes takes 5 positive ints"),
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"head_mixer": "halo", "head_mixer_args": {"block": 4}}, "mixer='halo' has no option 'block'"),
        ({"small_input": True}, "small_input=True are not the backbone's"),
    ],
)
def test_bad_detector_options_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sasa.create_model("retinanet_resnet26", **{**SMALL, **kwargs})


def test_small_input_false_is_the_standard_stem_a_shared_models_common_may_set():
    """configs/coco.yaml extends imagenet.yaml, whose models.common says small_input: false."""
    plain, explicit = (sasa.create_model("retinanet_resnet26", **SMALL, **kw) for kw in ({}, {"small_input": False}))
    assert plain.config == explicit.config and sasa.count(plain, 64) == sasa.count(explicit, 64)
