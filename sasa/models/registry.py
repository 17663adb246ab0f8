"""Model registry: ``create_model(name, **kwargs)`` instead of if-chains."""
from __future__ import annotations

from sasa.layers._checks import check_choice

_MODELS = {}


def register_model(fn):
    _MODELS[fn.__name__] = fn
    return fn


def list_models():
    return sorted(_MODELS)


def create_model(name, **kwargs):
    """Build a registered model, e.g. ``create_model("resnet50", form="full_attention")``."""
    check_choice("model", name, tuple(list_models()))
    return _MODELS[name](**kwargs)
