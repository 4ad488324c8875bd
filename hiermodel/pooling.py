"""Masked attention pooling built only from nn.Linear, so that Opacus computes per-sample gradients."""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where mask is True; all-masked rows give zeros, not NaN."""
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=dim)
    return torch.nan_to_num(weights, nan=0.0)


class AttentionPool(nn.Module):
    """Additive attention: weights = softmax(w · tanh(W x)); returns the weighted sum and the weights."""

    def __init__(self, dim: int, *, extra_dim: int = 0, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.key = nn.Linear(dim + extra_dim, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (..., S, D), mask: (..., S), extra: (..., S, E) side features that steer the weights
        keys_in = x if extra is None else torch.cat([x, extra], dim=-1)
        scores = self.score(torch.tanh(self.key(keys_in))).squeeze(-1)  # (..., S)
        weights = masked_softmax(scores, mask)
        return (weights.unsqueeze(-1) * x).sum(-2), weights
