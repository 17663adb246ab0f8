"""Sparse mixture-of-experts MLP of ST-MoE (Zoph et al., 2022), usable wherever a transformer takes
an MLP (timm's ``mlp_layer``).

A linear router scores every token against ``num_experts`` expert MLPs; each token goes to its
``top_k`` experts, weighted by their router probabilities renormalised over the chosen k (GShard's
top-2 gating). Every expert takes at most ``capacity = ceil(capacity_factor * tokens * top_k /
num_experts)`` tokens per forward pass; places are given first choices first (every token's first
choice, in token order, then every token's second choice, ...), and a choice that finds its expert
full is dropped: that expert adds nothing to the token (the block's residual still carries it).

Two auxiliary losses, added to the training loss (``aux_loss(model)``):

- load balancing (Switch / GShard): ``num_experts * sum_e f_e * P_e``, with ``f_e`` the fraction
  of tokens whose first choice is expert e and ``P_e`` the mean router probability of e; 1 when
  routing is uniform;
- router z-loss (ST-MoE): the mean over tokens of ``logsumexp(router logits)^2``, which keeps the
  logits small for a stable softmax.

Router and losses run in float32 whatever the model's precision, as ST-MoE recommends.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa.layers._checks import check_positive_int


class MoEMlp(nn.Module):
    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        act_layer=nn.GELU,
        norm_layer=None,
        bias=True,
        drop=0.0,
        num_experts=8,
        top_k=2,
        capacity_factor=1.25,
        load_balance_weight=1e-2,
        z_loss_weight=1e-3,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_positive_int("num_experts", num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor!r}")
        if norm_layer is not None:
            raise ValueError("MoEMlp has no norm inside the MLP (scale_mlp_norm); leave it off")
        hidden, out = hidden_features or in_features, out_features or in_features
        bias = (bias, bias) if isinstance(bias, bool) else tuple(bias)
        dd = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight
        self.router = nn.Linear(in_features, num_experts, bias=False, **dd)
        self.w1 = nn.Parameter(torch.empty(num_experts, in_features, hidden, **dd))
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden, **dd)) if bias[0] else None
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out, **dd))
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, out, **dd)) if bias[1] else None
        self.act = act_layer() if act_layer is not None else nn.GELU()
        self.drop = nn.Dropout(drop if isinstance(drop, (int, float)) else drop[0])
        for w in (self.w1, self.w2):  # each expert as nn.Linear initialises its weight
            nn.init.uniform_(w, -(w.shape[1] ** -0.5), w.shape[1] ** -0.5)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.dropped_fraction = torch.zeros(())

    def capacity(self, tokens):
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def route(self, x):
        """x: (T, D) -> gates (T, k), experts (T, k), kept (T, k) bool, slot (T, k) place in the expert
        buffer; sets the auxiliary losses."""
        T, E, k = x.shape[0], self.num_experts, self.top_k
        logits = self.router(x).float()
        probs = logits.softmax(-1)
        gates, experts = probs.topk(k, dim=-1)
        gates = gates / gates.sum(-1, keepdim=True)
        choice_major = experts.t().reshape(-1)  # every token's first choice, then every second choice
        position = (F.one_hot(choice_major, E).cumsum(0) - 1).gather(1, choice_major[:, None])[:, 0]
        capacity = self.capacity(T)
        kept = (position < capacity).view(k, T).t()
        slot = (choice_major * capacity + position).view(k, T).t()
        first = F.one_hot(experts[:, 0], E).float().mean(0)
        self.aux_losses = {
            "load_balance": E * (first * probs.mean(0)).sum(),
            "router_z": torch.logsumexp(logits, -1).pow(2).mean(),
        }
        self.dropped_fraction = 1 - kept.float().mean().detach()  # a tensor: no device sync here
        return gates, experts, kept, slot

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates, _, kept, slot = self.route(x)
        E, capacity = self.num_experts, self.capacity(x.shape[0])
        tokens = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(kept)[kept]
        slot = slot[kept]
        buffer = x.new_zeros(E * capacity, x.shape[1]).index_copy(0, slot, x[tokens]).view(E, capacity, -1)
        h = buffer @ self.w1 if self.b1 is None else torch.baddbmm(self.b1, buffer, self.w1)
        h = self.drop(self.act(h))
        out = h @ self.w2 if self.b2 is None else torch.baddbmm(self.b2, h, self.w2)
        weighted = out.reshape(E * capacity, -1)[slot] * gates[kept].to(out.dtype)[:, None]
        y = out.new_zeros(x.shape[0], out.shape[-1]).index_add(0, tokens, weighted)
        return y.view(*shape[:-1], -1)

    def weighted_aux_loss(self):
        if not self.aux_losses:
            return None
        return (
            self.load_balance_weight * self.aux_losses["load_balance"]
            + self.z_loss_weight * self.aux_losses["router_z"]
        )


def reference_moe_mlp(layer: MoEMlp, x):
    """The same layer token by token and choice by choice, for tests: slow and obviously right."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    gates, experts, kept, _ = layer.route(x)
    out = []
    for t in range(x.shape[0]):
        y = 0
        for j in range(layer.top_k):
            if kept[t, j]:
                e = experts[t, j]
                h = x[t] @ layer.w1[e] + (0 if layer.b1 is None else layer.b1[e, 0])
                y = y + gates[t, j].to(x.dtype) * (
                    (layer.act(h) @ layer.w2[e]) + (0 if layer.b2 is None else layer.b2[e, 0])
                )
        out.append(y if torch.is_tensor(y) else x.new_zeros(layer.w2.shape[-1]))
    return torch.stack(out).view(*shape[:-1], -1)


def aux_loss(model: nn.Module):
    """The weighted sum of every MoE layer's auxiliary losses from the last forward pass (None
    without MoE layers), and their unweighted means by name for logging."""
    layers = [m for m in model.modules() if isinstance(m, MoEMlp) and m.aux_losses]
    if not layers:
        return None, {}
    total = sum(m.weighted_aux_loss() for m in layers)
    means = {name: sum(m.aux_losses[name] for m in layers) / len(layers) for name in layers[0].aux_losses}
    means["dropped_fraction"] = sum(m.dropped_fraction for m in layers) / len(layers)
    return total, means
