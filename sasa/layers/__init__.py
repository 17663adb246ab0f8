from sasa.layers.global_attention import AttentionAugmentedConv2d, BoTAttention2d
from sasa.layers.halo import HaloAttention2d
from sasa.layers.mixers import MIXERS, create_mixer
from sasa.layers.neighborhood import NeighborhoodAttention2d
from sasa.layers.san import SANPairwise2d, SANPatchwise2d
from sasa.layers.sasa2d import POS_ENCODINGS, SASA2d
from sasa.layers.stem import STEMS, StemAttention2d, attention_stem, conv_stem

__all__ = [
    "MIXERS", "POS_ENCODINGS", "STEMS", "AttentionAugmentedConv2d", "BoTAttention2d", "HaloAttention2d", "NeighborhoodAttention2d",
    "SANPairwise2d", "SANPatchwise2d", "SASA2d", "StemAttention2d", "attention_stem", "conv_stem", "create_mixer",
]
