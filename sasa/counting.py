"""Exact parameter, multiply-add and FLOP counts (FLOPs = 2 x multiply-adds, the paper's convention).

What ``torch.utils.flop_counter`` sees, and so what is counted:

- convolutions, linear layers and matmuls, by the counter's own formulas;
- fused attention (``F.scaled_dot_product_attention``), by the counter's formula for the GPU
  kernels; this torch registers none for the CPU's flash kernel, so the same formula is registered
  for it below (only where torch has none of its own);
- SASA's local attention: its op (``sasa::local_attention``) has its own registered formula
  (logits, the weighting of the values, the factorised relative terms). While a counter runs the op
  runs on every device; on CUDA outside a counter it is FlexAttention, which the counter would score
  as dense attention over every pixel;
- every other mixer through its reference kernel, whose einsums the counter sees directly
  (``sasa.layers._kernels`` switches to it while a counter runs).

Batch norm, activations, pooling, softmax and residual additions are not counted, as in the paper
and torchvision. Which kernel trains and on which device does not change what is counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

_aten = torch.ops.aten
_CPU_SDPA = _aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BACKWARD = _aten._scaled_dot_product_flash_attention_for_cpu_backward

# The same formulas the counter uses for the GPU's fused attention (two matmuls forward, four
# backward); registered only where this torch has none of its own.
if _CPU_SDPA not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


if _CPU_SDPA_BACKWARD not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA_BACKWARD)
    def _cpu_sdpa_backward_flop(
        grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
    ) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def counting_flops() -> bool:
    """Whether a ``FlopCounterMode`` is counting now: kernels switch to what it can count exactly."""
    return any(isinstance(mode, _FlopCounterMode) for mode in _get_current_dispatch_mode_stack())


@dataclass(frozen=True)
class Counts:
    params: int
    macs: int
    flops: int

    def as_dict(self):
        return asdict(self)


def _input_shape(model, input_size):
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    input_size = tuple(input_size)
    if len(input_size) == 2:
        input_size = (getattr(model, "in_chans", 3),) + input_size
    if len(input_size) != 3 or not all(isinstance(n, int) and n > 0 for n in input_size):
        raise ValueError(f"input_size must be a resolution, (H, W) or (C, H, W) of positive ints, got {input_size!r}")
    return (1,) + input_size


def count(model: torch.nn.Module, input_size) -> Counts:
    """Parameters and per-image multiply-adds / FLOPs of one forward pass at ``input_size``."""
    params = sum(p.numel() for p in model.parameters())
    shape = _input_shape(model, input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(shape, device=device))
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    return Counts(params=params, macs=flops // 2, flops=flops)
