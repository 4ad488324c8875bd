"""Scores (user, candidate) pairs: text interest (cosine of z and the item tower) plus the repeat signal."""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F


NORM_EPS = 1e-12  # F.normalize's default: below it a row is divided by eps instead of its norm


class ItemTower(nn.Linear):
    """A linear item tower with unit-norm outputs: (B, C, D) per-user candidates in, (B, C, d) out;
    or the shared catalogue (N, D) in, (N, d) out, projected and normalised once for the whole batch.

    Under Opacus (hooks on this layer) the shared output is expanded over the batch as a view, so
    the backward hook sees each user's own backprop; the grad sampler below then computes each
    user's gradient exactly. Without hooks nothing needs it: the plain step stays (N, d), as
    gradients over a (B, N, d) copy cost more than the rest of the step. ``anchor`` (B,) only
    tells the hooks the batch size.
    """

    def forward(self, items: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        out = F.normalize(super().forward(items), dim=-1, eps=NORM_EPS)
        per_sample = bool(self._forward_hooks)  # Opacus captures activations with a forward hook
        return out.unsqueeze(0).expand(anchor.shape[0], -1, -1) if items.dim() == 2 and per_sample else out


def _through_normalize(layer: ItemTower, items: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Backprops at the unit-norm output -> at the projection: the Jacobian of u / max(|u|, eps)."""
    projected = F.linear(items, layer.weight, layer.bias)  # (N, d) shared or (B, N, d) per user
    norm = projected.norm(dim=-1, keepdim=True)
    unit = projected / norm.clamp(min=NORM_EPS)
    radial = (backprops * unit).sum(-1, keepdim=True) * (norm > NORM_EPS)  # no radial part below eps
    return (backprops - radial * unit) / norm.clamp(min=NORM_EPS)


@register_grad_sampler(ItemTower)
def _item_tower_grad_sample(layer: ItemTower, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-user gradients of the item tower: Σ_c backprop[b, c] ⊗ item[c] (items shared or per user)."""
    items = activations[0]
    if backprops.dim() != 3:
        raise RuntimeError("ItemTower's per-sample gradients need its output expanded per user (B, N, d)")
    backprops = _through_normalize(layer, items, backprops)
    if items.dim() == 2:  # the shared catalogue
        weight = torch.einsum("bnd,nk->bdk", backprops, items)
    else:
        weight = torch.einsum("bnd,bnk->bdk", backprops.flatten(1, -2), items.flatten(1, -2))
    grads = {layer.weight: weight}
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.flatten(1, -2).sum(1)
    return grads


class Scorer(nn.Module):
    """Wide and deep over x = [repeat/popularity/user features, cos(z, t_c)]: score = w·x + MLP(x).

    The linear part lets the text interest and the repeat signal add up directly; the MLP learns
    their interactions (e.g. that text matters most for items the user never bought).
    """

    def __init__(self, *, backbone_dim: int, dim: int, num_features: int, hidden: int, text_scale: float) -> None:
        super().__init__()
        self.item_tower = ItemTower(backbone_dim, dim)
        self.wide = nn.Linear(num_features + 1, 1)
        self.hidden = nn.Linear(num_features + 1, hidden)
        self.output = nn.Linear(hidden, 1)
        self.text_scale = text_scale
        with torch.no_grad():  # start from "text interest alone" so early steps keep the text signal
            self.wide.weight.zero_()
            self.wide.weight[0, -1] = text_scale

    def item_vectors(self, sentence: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B, C, D) per-user backbone vectors -> (B, C, d) unit-norm candidate vectors; (N, D) shared
        ones -> (N, d), or (B, N, d) under Opacus' hooks (ItemTower)."""
        return self.item_tower(sentence.float(), sentence.new_empty(batch_size))

    def text_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users (B, L, d), items (B, C, d) or shared (C, d) -> scaled cosines (B, L, C)."""
        pattern = "bld,bcd->blc" if items.dim() == 3 else "bld,cd->blc"
        return self.text_scale * torch.einsum(pattern, F.normalize(users, dim=-1), items)

    def parts(self, text: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear and the MLP part of the score, each (B, C); explanations show them apart."""
        x = torch.cat([features, text.unsqueeze(-1) / self.text_scale], dim=-1)
        return self.wide(x).squeeze(-1), self.output(torch.relu(self.hidden(x))).squeeze(-1)

    def forward(self, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # text: (B, C) combined text score (scaled cosine), features: (B, C, F) -> (B, C)
        linear, interaction = self.parts(text, features)
        return linear + interaction
