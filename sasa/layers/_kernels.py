"""Which kernel a layer runs: its own choice (``impl``), except while ``torch.utils.flop_counter``
counts, when it runs ``counted_impl``, the kernel whose multiply-adds the counter sees exactly.

So a model is counted the same whichever kernel it trains with, by ``sasa.counting``, by
Lightning's model summary or by a user's own ``FlopCounterMode``, and the counter never decides
which kernel trains.
"""

from __future__ import annotations

from sasa.counting import counting_flops


def kernel(layer) -> str:
    return layer.counted_impl if counting_flops() else layer.impl
