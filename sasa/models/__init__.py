from sasa.models import resnet  # noqa: F401  (registers the ResNets)
from sasa.models.registry import create_model, list_models, register_model
from sasa.models.resnet import FORMS, ResNet, from_torchvision_state_dict

__all__ = ["FORMS", "ResNet", "create_model", "from_torchvision_state_dict", "list_models", "register_model"]
