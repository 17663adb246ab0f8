"""Model registry: ``create_model(name, **kwargs)`` instead of if-chains. Names starting with
``timm:`` are timm's architectures (``sasa.models.timm_source``)."""
from __future__ import annotations

from sasa.layers._checks import check_choice
from sasa.models.timm_source import PREFIX as TIMM_PREFIX
from sasa.models.timm_source import create_timm_model

_MODELS = {}


def register_model(fn):
    _MODELS[fn.__name__] = fn
    return fn


def list_models():
    """This library's own models; any timm model is also available as ``timm:NAME``."""
    return sorted(_MODELS)


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def check_model(name):
    """A ValueError naming the allowed models, unless ``name`` is one (a timm name is checked by timm_source)."""
    if not is_timm(name):
        check_choice("model", name, (*list_models(), f"{TIMM_PREFIX}NAME (a timm model)"))


def create_model(name, **kwargs):
    """Build a registered model, e.g. ``create_model("resnet50", form="full_attention")`` or
    ``create_model("timm:vit_small_patch16_224", img_size=32, patch_size=4)``."""
    if is_timm(name):
        return create_timm_model(name[len(TIMM_PREFIX):], **kwargs)
    check_model(name)
    return _MODELS[name](**kwargs)
