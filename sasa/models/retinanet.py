"""RetinaNet (Lin et al., 2017) over this library's ResNets: the paper's Table 2.

Built from torchvision's detection pieces (``RetinaNet`` with its anchor generator, box coding,
focal and L1 losses and post-processing; ``BackboneWithFPN``; ``LastLevelP6P7``; the RetinaNet
heads), as torchvision's ``retinanet_resnet50_fpn`` is: P3-P5 from the ResNet's groups 2-4, P6 and
P7 by strided 3x3 convolutions of P5, 256 channels, four 3x3 convolutions in each head. Table 2
has two axes, and so do these models:

- the backbone: any ResNet option (``form``, ``stem``, ``attention_groups``, ``mixer``, ...);
- the FPN and heads: ``head_mixer`` (default ``conv``: torchvision's convolutions) replaces every
  3x3 convolution of the FPN's outputs, of P6/P7 and of the two head towers by a registered mixer
  (``sasa``: the paper's attention FPN and heads). The heads' last convolutions, which predict
  each anchor's class logits and box offsets, stay convolutions.

Images are resized so their shorter side is ``image_size`` (at most ``image_size`` on the longer
one too: square inputs keep their size), and parameters and FLOPs are counted at that size.
"""

from __future__ import annotations

import torch.nn as nn

from sasa.layers import MIXERS, create_mixer
from sasa.layers._checks import check_choice, check_positive_int
from sasa.models.registry import register_model
from sasa.models.resnet import ResNet

FAMILY = "RetinaNet"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _spatial_convs(module: nn.Module, skip: tuple[nn.Module, ...]):
    """(parent, attribute name, conv) of every 3x3 convolution below ``module`` but those in ``skip``."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3) and child not in skip:
                yield parent, name, child


def _replace_spatial_convs(modules, skip, mixer: str, shared: dict, options: dict):
    """Each 3x3 convolution becomes ``mixer``; the heads' in-place ReLUs become out-of-place, since an
    attention op keeps its output for its backward pass."""
    for module in modules:
        for parent, name, conv in list(_spatial_convs(module, skip)):
            stride = conv.stride[0]
            setattr(parent, name, create_mixer(mixer, conv.in_channels, conv.out_channels, stride, shared, **options))
        for relu in module.modules():
            if isinstance(relu, nn.ReLU):
                relu.inplace = False


def retinanet(
    blocks,
    *,
    num_classes=91,
    in_chans=3,
    image_size=640,
    fpn_channels=256,
    anchor_sizes=(32, 64, 128, 256, 512),
    head_mixer="conv",
    head_mixer_args=None,
    image_mean=None,
    image_std=None,
    **backbone_kwargs,
):
    """torchvision's ``RetinaNet`` whose backbone is a ``sasa`` ResNet of ``blocks`` (``backbone_kwargs``
    are its options), with the attention FPN and heads of Table 2 when ``head_mixer`` is not ``conv``.
    ``model.config`` records every option, as the classifiers record theirs. torchvision is imported
    here, so that ``import sasa`` does not pay for it."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    check_positive_int("num_classes", num_classes)
    check_positive_int("image_size", image_size)
    check_positive_int("fpn_channels", fpn_channels)
    check_choice("head_mixer", head_mixer, tuple(MIXERS))
    anchor_sizes = tuple(anchor_sizes)
    if len(anchor_sizes) != 5 or not all(isinstance(s, int) and s > 0 for s in anchor_sizes):
        raise ValueError(f"anchor_sizes takes 5 positive ints, one per level P3-P7; got {anchor_sizes!r}")
    if "num_classes" in backbone_kwargs or backbone_kwargs.get("small_input"):
        raise ValueError(
            "num_classes and small_input=True are not the backbone's: a detector's classes are its own, and its "
            "images are resized to image_size, so the backbone keeps the standard stem"
        )
    head_mixer_args = dict(head_mixer_args or {})
    resnet = ResNet(blocks, num_classes=1, in_chans=in_chans, **backbone_kwargs)
    backbone = BackboneWithFPN(
        resnet,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[getattr(resnet, f"layer{g}")[-1].expand.out_channels for g in (2, 3, 4)],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )
    # three scales per octave and three aspect ratios per level, as torchvision's RetinaNet
    sizes = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in anchor_sizes)
    if image_mean is None:
        image_mean, image_std = (
            (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.25,) * in_chans)
        )
    model = RetinaNet(
        backbone,
        num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
    )
    if head_mixer != "conv":
        shared = {k: resnet.config[k] for k in ("kernel_size", "heads", "pos_enc")}
        shared["impl"] = backbone_kwargs.get("impl", "fast")
        predictors = (model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg)
        parts = (model.backbone.fpn.layer_blocks, model.backbone.fpn.extra_blocks, model.head)
        _replace_spatial_convs(parts, predictors, head_mixer, shared, head_mixer_args)
    model.in_chans = in_chans
    model.min_input_size = resnet.min_input_size  # the backbone's: the pipeline checks image sizes without a forward
    model.config = {
        **{k: v for k, v in resnet.config.items() if k != "num_classes"},
        "num_classes": num_classes,
        "image_size": image_size,
        "fpn_channels": fpn_channels,
        "anchor_sizes": list(anchor_sizes),
        "head_mixer": head_mixer,
        "head_mixer_args": head_mixer_args,
    }
    return model


@register_model(family=FAMILY, task="detection")
def retinanet_resnet26(**kwargs):
    return retinanet([1, 2, 4, 1], **kwargs)


@register_model(family=FAMILY, task="detection")
def retinanet_resnet38(**kwargs):
    return retinanet([2, 3, 5, 2], **kwargs)


@register_model(family=FAMILY, task="detection")
def retinanet_resnet50(**kwargs):
    return retinanet([3, 4, 6, 3], **kwargs)
