"""Every FLOP formula this project registers with ``torch.utils.flop_counter`` (the local-attention
op's forward and backward in ``sasa.ops.local_attention``, the CPU fused attention's backward in
``sasa.counting``; its forward: tests/pipeline/test_transformer_families.py) agrees with an
independent count of the same computation written as matrix products, which the counter scores by
its own formulas."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import sasa  # noqa: F401  (registers the CPU fused attention's formulas)
from sasa.ops.local_attention import fast_local_attention


def _flops(fn):
    """(FLOPs of the forward pass, FLOPs of the backward pass) of fn() -> (output, inputs)."""
    with FlopCounterMode(display=False) as counter:
        out, inputs = fn()
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    return forward, counter.get_total_flops()


def _windows(t, kernel_size):
    """(B, heads, d, H, W) -> (B, heads, d, k*k, H, W): im2col, no arithmetic."""
    B, heads, d, H, W = t.shape
    return F.unfold(t.reshape(B, heads * d, H, W), kernel_size, padding=kernel_size // 2).view(B, heads, d, -1, H, W)


def _einsum_logits(q, k, kernel_size, rel_row, rel_col):
    """q.k over each window and the factorised relative tables, as einsums (batched matmuls)."""
    logits = torch.einsum("bhdyx,bhdnyx->bhnyx", q, _windows(k, kernel_size))
    if rel_row is None:
        return logits
    half = rel_row.shape[1]
    row = torch.einsum("bhcyx,hck->bhkyx", q[:, :, :half], rel_row)
    col = torch.einsum("bhcyx,hck->bhkyx", q[:, :, half:], rel_col)
    B, heads, _, H, W = q.shape
    return logits + (row[:, :, :, None] + col[:, :, None, :]).reshape(B, heads, -1, H, W)


@pytest.mark.parametrize("rel", [True, False])
def test_local_attention_formulas_count_the_einsum_formulation(rel):
    """Forward: logits + weighted sum of values (+ relative tables), as the einsums count them.
    Backward: the einsums' backward (two products each) plus the logits again, which the fast
    kernel recomputes from the saved log-sum-exp instead of storing them."""
    B, heads, d, H, W, k = 2, 3, 4, 5, 6, 5
    g = torch.Generator().manual_seed(0)
    q, kk, v = (torch.randn(B, heads, d, H, W, generator=g, requires_grad=True) for _ in range(3))
    rr, rc = (torch.randn(heads, d // 2, k, generator=g, requires_grad=True) for _ in range(2)) if rel else (None, None)
    leaves = [t for t in (q, kk, v, rr, rc) if t is not None]

    def einsums():
        attn = _einsum_logits(q, kk, k, rr, rc).softmax(2)  # softmax and masking: not counted
        return torch.einsum("bhnyx,bhdnyx->bhdyx", attn, _windows(v, k)), leaves

    fast_forward, fast_backward = _flops(lambda: (fast_local_attention(q, kk, v, k, rr, rc), leaves))
    forward, backward = _flops(einsums)
    logits, _ = _flops(lambda: (_einsum_logits(q, kk, k, rr, rc), [t for t in leaves if t is not v]))
    assert fast_forward == forward > 0
    assert fast_backward == backward + logits


@pytest.mark.parametrize("shape", [(2, 3, 10, 8), (1, 2, 7, 5)])
def test_cpu_fused_attention_counts_its_math_path_forward_and_backward(shape):
    """The CPU's fused attention (which the counter alone scores 0) against its unfused math path
    (two matrix products forward, four backward); the fused backward, like the GPU's (whose
    formula it uses), also counts the recomputed q.k products."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, requires_grad=True) for _ in range(3))

    def attention():
        return F.scaled_dot_product_attention(q, k, v), [q, k, v]

    with FlopCounterMode(display=False) as counter:
        attention()
    assert (
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in counter.get_flop_counts()["Global"]
    )  # the fused kernel ran
    fused = _flops(attention)
    with sdpa_kernel(SDPBackend.MATH):
        math_path = _flops(attention)
    B, heads, L, d = shape
    product = 2 * B * heads * L * L * d  # FLOPs of one (L x d) @ (d x L) product per head
    assert math_path == (2 * product, 4 * product)
    assert fused == (math_path[0], math_path[1] + product)
