"""Which kernel a layer runs: its own choice (``impl``), except while ``torch.utils.flop_counter``
counts, when it runs ``counted_impl``, the kernel whose multiply-adds the counter sees exactly.

So a model is counted the same whichever kernel it trains with, by ``sasa.counting``, by
Lightning's model summary or by a user's own ``FlopCounterMode``, and the counter never decides
which kernel trains.
"""
from __future__ import annotations

from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import _FlopCounterMode


def counting_flops() -> bool:
    return any(isinstance(mode, _FlopCounterMode) for mode in _get_current_dispatch_mode_stack())


def kernel(layer) -> str:
    return layer.counted_impl if counting_flops() else layer.impl
