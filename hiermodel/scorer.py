"""Scores (user, candidate) pairs: text interest (cosine of z and the item tower) plus the repeat signal."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Scorer(nn.Module):
    """Wide and deep over x = [repeat/popularity/user features, cos(z, t_c)]: score = w·x + MLP(x).

    The linear part lets the text interest and the repeat signal add up directly; the MLP learns
    their interactions (e.g. that text matters most for items the user never bought).
    """

    def __init__(self, *, backbone_dim: int, dim: int, num_features: int, hidden: int, text_scale: float) -> None:
        super().__init__()
        self.item_tower = nn.Linear(backbone_dim, dim)
        self.wide = nn.Linear(num_features + 1, 1)
        self.hidden = nn.Linear(num_features + 1, hidden)
        self.output = nn.Linear(hidden, 1)
        self.text_scale = text_scale
        with torch.no_grad():  # start from "text interest alone" so early steps keep the text signal
            self.wide.weight.zero_()
            self.wide.weight[0, -1] = text_scale

    def item_vectors(self, sentence: torch.Tensor) -> torch.Tensor:
        """(…, D) backbone sentence vectors -> (…, d) unit-norm candidate vectors."""
        return F.normalize(self.item_tower(sentence.float()), dim=-1)

    def text_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users (B, L, d), items (B, C, d) or (C, d) -> scaled cosines (B, L, C)."""
        users = F.normalize(users, dim=-1)
        if items.dim() == 2:
            return self.text_scale * torch.einsum("bld,cd->blc", users, items)
        return self.text_scale * torch.einsum("bld,bcd->blc", users, items)

    def forward(self, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # text: (B, C) combined text score (scaled cosine), features: (B, C, F) -> (B, C)
        x = torch.cat([features, text.unsqueeze(-1) / self.text_scale], dim=-1)
        return (self.wide(x) + self.output(torch.relu(self.hidden(x)))).squeeze(-1)
