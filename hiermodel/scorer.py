"""Scores (user, candidate) pairs: text interest (cosine of z and the item tower) plus the repeat signal."""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F


class ItemTower(nn.Linear):
    """A linear item tower that also scores the shared catalogue: (N, D) in, (B, N, d) out.

    Every user's loss sees the same catalogue rows, so Opacus' hooks cannot split the usual way;
    the grad sampler below computes each user's gradient exactly, as its backprop times the catalogue.
    ``anchor`` (B,) only tells the hooks the batch size.
    """

    def forward(self, items: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        out = super().forward(items)
        return out.unsqueeze(0).expand(anchor.shape[0], -1, -1) if items.dim() == 2 else out


@register_grad_sampler(ItemTower)
def _item_tower_grad_sample(layer: ItemTower, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-user gradients of the item tower: Σ_c backprop[b, c] ⊗ item[c] (items shared or per user)."""
    items = activations[0]
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
        """(B, C, D) per-user or (N, D) shared backbone vectors -> (B, C, d) unit-norm candidate vectors."""
        anchor = sentence.new_empty(batch_size)
        return F.normalize(self.item_tower(sentence.float(), anchor), dim=-1)

    def text_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users (B, L, d), items (B, C, d) -> scaled cosines (B, L, C)."""
        return self.text_scale * torch.einsum("bld,bcd->blc", F.normalize(users, dim=-1), items)

    def parts(self, text: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear and the MLP part of the score, each (B, C); explanations show them apart."""
        x = torch.cat([features, text.unsqueeze(-1) / self.text_scale], dim=-1)
        return self.wide(x).squeeze(-1), self.output(torch.relu(self.hidden(x))).squeeze(-1)

    def forward(self, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # text: (B, C) combined text score (scaled cosine), features: (B, C, F) -> (B, C)
        linear, interaction = self.parts(text, features)
        return linear + interaction
