"""timm's architectures as models of this library: ``create_model("timm:vit_tiny_patch16_224",
img_size=20, patch_size=4)``.

timm is the field's well-kept home of ViT, MaxViT, CoAtNet, LeViT, MViTv2 and many more, so they
are not rewritten here. A model is always built with ``pretrained=False`` (nothing is ever
downloaded); every other keyword argument is timm's, plus one of this library: ``moe``, the options
of ``sasa.layers.moe.MoEMlp``, puts the ST-MoE layer in place of the MLP of models that take an
``mlp_layer`` (ViT and its relatives).
"""

from __future__ import annotations

import difflib
import functools

import torch.nn as nn

PREFIX = "timm:"

# the families of the literature this project compares, by timm's name prefixes (the report's markers)
FAMILIES = {"vit": "ViT", "deit": "ViT", "maxvit": "MaxViT", "coatnet": "CoAtNet", "levit": "LeViT", "mvitv2": "MViTv2"}


def family(name: str) -> str:
    """The family of a timm model name (``vit_small_patch16_224`` -> ``ViT``), or the name's first part."""
    head = name.split("_", 1)[0]
    return FAMILIES.get(head, head)


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need the timm package (pip install timm)") from None
    return timm


def check_name(name: str):
    timm = _timm()
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(PREFIX + c for c in close)}" if close else "; see timm.list_models()"
        raise ValueError(f"model={PREFIX + name!r} is not a timm model{hint}")


def create_timm_model(name: str, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> nn.Module:
    """A freshly initialised timm model, its arguments recorded in ``model.config`` as the library's
    ResNets record theirs (runs are identified by them)."""
    from sasa.layers.moe import MoEMlp

    check_name(name)
    if "pretrained" in kwargs or "pretrained_cfg_overlay" in kwargs or "checkpoint_path" in kwargs:
        raise ValueError("timm models are built untrained here (no download, no checkpoint); drop 'pretrained'")
    timm_kwargs = dict(kwargs)
    moe = timm_kwargs.pop("moe", None)
    if moe is not None:
        if not isinstance(moe, dict):
            raise ValueError(
                f"moe takes the options of MoEMlp as a mapping, e.g. {{num_experts: 4, top_k: 2}}; got {moe!r}"
            )
        try:
            MoEMlp(8, 8, **moe)  # options checked by name and value before timm sees them
        except TypeError as err:
            raise ValueError(f"moe: {err}") from None
        timm_kwargs["mlp_layer"] = functools.partial(MoEMlp, **moe)
    try:
        model = _timm().create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    except TypeError as err:  # an unknown keyword: timm's message names it
        raise ValueError(f"{PREFIX}{name}: {err}") from None
    except AssertionError as err:  # timm checks sizes with asserts (window vs map, patch vs image)
        raise ValueError(f"{PREFIX}{name}: {err or 'timm rejected these arguments'}") from None
    model.config = {"family": family(name), "num_classes": num_classes, "in_chans": in_chans, **kwargs}
    model.in_chans = in_chans
    return model
