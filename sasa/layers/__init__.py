from sasa.layers.mixers import MIXERS, create_mixer
from sasa.layers.sasa2d import POS_ENCODINGS, SASA2d
from sasa.layers.stem import STEMS, SpatiallyAwareAttention, attention_stem, conv_stem

__all__ = ["MIXERS", "POS_ENCODINGS", "SASA2d", "STEMS", "SpatiallyAwareAttention", "attention_stem", "conv_stem", "create_mixer"]
