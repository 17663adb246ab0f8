"""The layers: SASA, the attention stems and every registered mixer (``sasa.layers.registry``).

Importing the package imports each of its modules, so every mixer's registration runs and its
class is exported here under its own name: a new mixer module needs no line added anywhere else.
"""

import importlib
import pkgutil

from sasa.layers.mixers import MIXER_INFO, MIXERS, create_mixer
from sasa.layers.sasa2d import POS_ENCODINGS, SASA2d
from sasa.layers.stem import STEMS, StemAttention2d, attention_stem, conv_stem

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
del _module
globals().update({info.cls.__name__: info.cls for info in MIXER_INFO.values()})

__all__ = [
    "MIXERS",
    "MIXER_INFO",
    "POS_ENCODINGS",
    "STEMS",
    "SASA2d",
    "StemAttention2d",
    "attention_stem",
    "conv_stem",
    "create_mixer",
    *sorted(info.cls.__name__ for info in MIXER_INFO.values()),
]
