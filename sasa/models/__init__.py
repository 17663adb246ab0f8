from sasa.models import cvt, resnet, retinanet  # noqa: F401  (registers CvT, the ResNets and the detectors)
from sasa.models.registry import (
    create_model,
    is_resnet,
    is_timm,
    list_models,
    model_family,
    model_task,
    register_model,
)
from sasa.models.resnet import FORMS, ResNet, from_torchvision_state_dict

__all__ = [
    "FORMS",
    "ResNet",
    "create_model",
    "from_torchvision_state_dict",
    "is_resnet",
    "is_timm",
    "list_models",
    "model_family",
    "model_task",
    "register_model",
]
