"""Stand-Alone Self-Attention in Vision Models (Ramachandran et al., 2019) in plain PyTorch."""

from sasa.counting import Counts, count
from sasa.layers import SASA2d, StemAttention2d
from sasa.models import FORMS, ResNet, create_model, list_models

__all__ = ["Counts", "FORMS", "ResNet", "SASA2d", "StemAttention2d", "count", "create_model", "list_models"]
