"""Model registry: ``create_model(name, **kwargs)`` instead of if-chains. Names starting with
``timm:`` are timm's architectures (``sasa.models.timm_source``).

Each model registers itself with its family: the ResNets take their options as keys of their own
(form, stem, mixer, ...), every other family takes them as one mapping (``model_args``), and the
report groups runs by family. What enumerates models reads this registry."""

from __future__ import annotations

from sasa.layers._checks import check_choice
from sasa.models.timm_source import PREFIX as TIMM_PREFIX
from sasa.models.timm_source import create_timm_model
from sasa.models.timm_source import family as timm_family

RESNET = "ResNet"
TASKS = ("classification", "detection")
_MODELS = {}  # name -> (builder, family, task)


def register_model(*, family: str, task: str = "classification"):
    """Decorator: ``@register_model(family="ResNet")`` adds the builder under its function name."""
    check_choice("task", task, TASKS)

    def add(builder):
        if builder.__name__ in _MODELS:
            raise ValueError(f"model {builder.__name__!r} is registered twice")
        _MODELS[builder.__name__] = (builder, family, task)
        return builder

    return add


def list_models(family: str | None = None, task: str | None = None):
    """This library's own models (of one family, for one task); any timm classifier is also available
    as ``timm:NAME``."""
    return sorted(
        name
        for name, (_, fam, tsk) in _MODELS.items()
        if (family is None or fam == family) and (task is None or tsk == task)
    )


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def model_family(name: str) -> str:
    """``ResNet``, ``CvT``, ``RetinaNet``, or a timm model's family (``timm:vit_small_patch16_224`` -> ``ViT``)."""
    if is_timm(name):
        return timm_family(name[len(TIMM_PREFIX) :])
    check_model(name)
    return _MODELS[name][1]


def model_task(name: str) -> str:
    """``classification`` or ``detection``: what the model is trained for (timm's models classify)."""
    if is_timm(name):
        return "classification"
    check_model(name)
    return _MODELS[name][2]


def is_resnet(name: str) -> bool:
    """Whether ``name`` is one of the ResNets, which take the paper's architecture keys."""
    return not is_timm(name) and name in _MODELS and _MODELS[name][1] == RESNET


def check_model(name, task: str | None = None):
    """A ValueError naming the allowed models (for ``task``), unless ``name`` is one (a timm name, a
    classifier, is checked by timm_source)."""
    if is_timm(name) and task in (None, "classification"):
        return
    timm = (f"{TIMM_PREFIX}NAME (a timm model)",) if task in (None, "classification") else ()
    check_choice("model", name, (*list_models(task=task), *timm))


def create_model(name, **kwargs):
    """Build a registered model, e.g. ``create_model("resnet50", form="full_attention")`` or
    ``create_model("timm:vit_small_patch16_224", img_size=32, patch_size=4)``."""
    if is_timm(name):
        return create_timm_model(name[len(TIMM_PREFIX) :], **kwargs)
    check_model(name)
    return _MODELS[name][0](**kwargs)
