"""Attention modules a block can add beside its mixer (``block_attention`` of the ResNets), as the
empirical study of attention modules and GCNet compare them: timm's layers, set as their papers did.

- ``se``: squeeze-and-excitation (Hu et al.): channel gates from the mean over pixels through a
  C -> C/16 -> C MLP;
- ``eca``: efficient channel attention (Wang et al.): channel gates from a 1-D convolution over the
  channels' means, its size odd(|log2 C + 1| / 2), no reduction;
- ``cbam``: CBAM (Woo et al.): channel gates from mean and max through one shared C/16 MLP, then
  spatial gates from a 7x7 convolution over the channels' mean and max maps;
- ``gc``: GCNet's global context block (Cao et al.): one attention-pooled context vector, through
  C -> C/16 (layer norm, ReLU) -> C, added to every pixel (the paper's "add" fusion; the last layer
  starts at zero, so the block starts as the identity).

Each goes after the block's last batch norm, before the residual sum (where SE, CBAM and GC put it).
"""

from __future__ import annotations

import torch.nn as nn

from sasa.layers._checks import check_choice

# timm is imported when a module is built, not with sasa: it pulls in torchvision and torch._dynamo,
# which would double the time of every `import sasa` (about 2 s of 4.5 s here).


def _squeeze_excitation(channels):
    from timm.layers import SEModule

    return SEModule(channels, rd_ratio=1 / 16, rd_divisor=1)


def _efficient_channel_attention(channels):
    from timm.layers import EcaModule

    return EcaModule(channels)


def _cbam(channels):
    from timm.layers.cbam import CbamModule

    return CbamModule(channels, rd_ratio=1 / 16, rd_divisor=1)


def _global_context(channels):
    """GCNet's block with "add" fusion, its transform's last layer (weight and bias) at zero as the
    authors' code initialises it."""
    from timm.layers.global_context import GlobalContext

    block = GlobalContext(channels, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16, rd_divisor=1)
    nn.init.zeros_(block.mlp_add.fc2.bias)
    return block


BLOCK_ATTENTIONS = {
    "se": _squeeze_excitation,
    "eca": _efficient_channel_attention,
    "cbam": _cbam,
    "gc": _global_context,
}


def create_block_attention(name, channels):
    """The module ``name`` over ``channels``, or None for no module."""
    if name is None:
        return None
    check_choice("block_attention", name, tuple(BLOCK_ATTENTIONS))
    return BLOCK_ATTENTIONS[name](channels)
