"""ResNet-26/38/50 bottleneck networks in conv, conv-stem + attention, full-attention and
per-group hybrid forms (the paper's Tables 1 and 3), with SASA or any other registered
attention mixer (``sasa.layers.mixers``) in the attention groups."""

from __future__ import annotations

import re

import torch.nn as nn

from sasa.layers import MIXERS, POS_ENCODINGS, STEMS, create_mixer
from sasa.layers._checks import check_choice, check_odd_kernel, check_positive_int
from sasa.layers.block_attention import BLOCK_ATTENTIONS, create_block_attention
from sasa.layers.stem import STEM_STRIDE
from sasa.models.registry import RESNET, register_model

GROUPS = (1, 2, 3, 4)
# A form is a shorthand for (stem, attention groups); explicit ``stem``/``attention_groups`` override it.
FORMS = {
    "conv": {"stem": "conv", "attention_groups": ()},
    "conv_stem_attention": {"stem": "conv", "attention_groups": GROUPS},
    "full_attention": {"stem": "attention", "attention_groups": GROUPS},
}


class Bottleneck(nn.Module):
    """1x1 reduce -> spatial mixer (3x3 conv or attention, carries the stride) -> 1x1 expand."""

    expansion = 4

    def __init__(self, in_channels, width, stride, mixer, shared, options, block_attention=None):
        super().__init__()
        out_channels = width * self.expansion
        self.reduce = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.mixer = create_mixer(mixer, width, width, stride, shared, **options)
        self.bn2 = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.attention = create_block_attention(block_attention, out_channels) or nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = self.act(self.bn1(self.reduce(x)))
        out = self.act(self.bn2(self.mixer(out)))
        out = self.attention(self.bn3(self.expand(out)))
        return self.act(out + self.shortcut(x))


def _attention_groups(value):
    groups = tuple(sorted(set(value)))
    if any(isinstance(g, bool) or not isinstance(g, int) or g not in GROUPS for g in groups):
        raise ValueError(f"attention_groups={tuple(value)!r} is not supported; each group must be one of {GROUPS}")
    return groups


class ResNet(nn.Module):
    """Bottleneck ResNet whose 3x3 convolutions are replaced by ``mixer`` (SASA by default; see
    ``sasa.layers.mixers.MIXERS``) in ``attention_groups``; ``mixer_args`` are that mixer's own
    options (e.g. ``{"block_size": 8, "halo": 3}`` for ``halo``).

    Module names: ``stem``, ``layer1``..``layer4`` (blocks with ``reduce``, ``mixer``,
    ``expand``, ``shortcut``), ``fc``. ``small_input=True`` swaps in stems that keep the input
    resolution (for 28-32 px images); the network's total stride is then 8 instead of 32.
    ``zero_init_residual=True`` starts every block as the identity (last batch-norm scale 0, as
    in Google's TPU ResNets): attention layers start as near-uniform window averages, and this
    keeps them from scrambling the residual stream (and the batch-norm statistics) early on.
    """

    def __init__(
        self,
        blocks,
        *,
        form="conv",
        attention_groups=None,
        stem=None,
        kernel_size=7,
        heads=8,
        pos_enc="relative",
        width=1.0,
        num_classes=1000,
        in_chans=3,
        small_input=False,
        zero_init_residual=False,
        impl="fast",
        mixer="sasa",
        mixer_args=None,
        block_attention=None,
    ):
        super().__init__()
        check_choice("form", form, tuple(FORMS))
        check_choice("mixer", mixer, tuple(MIXERS))
        if block_attention is not None:
            check_choice("block_attention", block_attention, tuple(BLOCK_ATTENTIONS))
        mixer_args = dict(mixer_args or {})
        stem = FORMS[form]["stem"] if stem is None else stem
        check_choice("stem", stem, tuple(STEMS))
        attention_groups = _attention_groups(
            FORMS[form]["attention_groups"] if attention_groups is None else attention_groups
        )
        check_odd_kernel("kernel_size", kernel_size)  # checked even where no group uses attention
        check_positive_int("heads", heads)
        check_choice("pos_enc", pos_enc, POS_ENCODINGS)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_chans", in_chans)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
            raise ValueError(f"width must be a positive number, got {width!r}")
        widths = [round(64 * width * 2**i) for i in range(4)]
        if widths[0] < 1:
            raise ValueError(f"width={width} leaves the first group with no channels")

        self.config = dict(
            form=form,
            stem=stem,
            attention_groups=attention_groups,
            kernel_size=kernel_size,
            heads=heads,
            pos_enc=pos_enc,
            width=width,
            num_classes=num_classes,
            in_chans=in_chans,
            small_input=small_input,
            zero_init_residual=zero_init_residual,
            mixer=mixer,
            mixer_args=mixer_args,
            block_attention=block_attention,
        )
        self.in_chans = in_chans
        self.min_input_size = STEM_STRIDE[bool(small_input)] * 8
        shared = dict(kernel_size=kernel_size, heads=heads, pos_enc=pos_enc, impl=impl)
        self.stem = STEMS[stem](in_chans, widths[0], small_input=small_input, heads=heads, pos_enc=pos_enc, impl=impl)
        channels, in_stride = widths[0], STEM_STRIDE[bool(small_input)]
        for group, (n, w) in enumerate(zip(blocks, widths), start=1):
            attends = group in attention_groups
            layer = []
            for i in range(n):
                stride = 2 if group > 1 and i == 0 else 1
                block = Bottleneck(
                    channels,
                    w,
                    stride,
                    mixer if attends else "conv",
                    shared,
                    mixer_args if attends else {},
                    block_attention,
                )
                # a mixer that needs maps of at least min_size px (neighbourhood windows) raises the input minimum
                self.min_input_size = max(
                    self.min_input_size, in_stride * (getattr(block.mixer, "min_size", 1) - 1) + 1
                )
                if layer and hasattr(block.mixer, "follow"):  # evolving attention reads the previous block's maps
                    block.mixer.follow(layer[-1].mixer)
                layer.append(block)
                channels, in_stride = w * Bottleneck.expansion, in_stride * stride
            self.add_module(f"layer{group}", nn.Sequential(*layer))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if zero_init_residual and isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is too small for this network: it needs at least "
                f"{self.min_input_size}x{self.min_input_size} (use small_input=True for 28-32 px images)"
            )
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


_TORCHVISION_KEYS = [
    (r"^conv1\.", "stem.conv."),
    (r"^bn1\.", "stem.bn."),
    (r"\.conv1\.", ".reduce."),
    (r"\.conv2\.", ".mixer."),
    (r"\.conv3\.", ".expand."),
    (r"\.downsample\.", ".shortcut."),
]


def from_torchvision_state_dict(state_dict):
    """Rename a torchvision ResNet state dict for the conv form, e.g. to start from its weights."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, repl in _TORCHVISION_KEYS:
            key = re.sub(pattern, repl, key)
        renamed[key] = value
    return renamed


@register_model(family=RESNET)
def resnet26(**kwargs):
    return ResNet([1, 2, 4, 1], **kwargs)


@register_model(family=RESNET)
def resnet38(**kwargs):
    return ResNet([2, 3, 5, 2], **kwargs)


@register_model(family=RESNET)
def resnet50(**kwargs):
    return ResNet([3, 4, 6, 3], **kwargs)
