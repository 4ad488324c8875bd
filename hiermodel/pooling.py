"""Masked attention pooling built only from nn.Linear, so that Opacus computes per-sample gradients."""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where mask is True; all-masked rows give zeros, not NaN."""
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=dim)
    return torch.nan_to_num(weights, nan=0.0)


def segment_softmax(scores: torch.Tensor, mask: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    """Softmax of scores (B, P) within each segment (B, P) long in [0, segments), where mask is True;
    masked entries get 0. The same values as masked_softmax over a (B, segments, P') padded layout."""
    # shift by each segment's max (softmax does not change; detached, as the shift has no gradient)
    top = scores.new_full((scores.shape[0], segments), float("-inf"))
    top = top.scatter_reduce(1, segment, scores.detach().masked_fill(~mask, float("-inf")), "amax")
    top = top.masked_fill(torch.isinf(top), 0.0)  # segments without entries: nothing to shift
    # masked entries go through exp(0) and are zeroed after: no inf or NaN reaches the gradient
    e = torch.exp(torch.where(mask, scores - top.gather(1, segment), 0.0)) * mask
    total = scores.new_zeros(scores.shape[0], segments).scatter_add(1, segment, e)
    total = torch.where(total > 0, total, 1.0)  # a real entry's segment holds at least its max's exp(0) = 1
    return e / total.gather(1, segment)


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

    def pool_segments(self, x: torch.Tensor, mask: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
        """x (B, P, D) in segments (B, P) long -> (B, segments, D): the same pooling within each segment
        (a segment without entries pools to 0), for rows packed without padding."""
        scores = self.score(torch.tanh(self.key(x))).squeeze(-1)  # (B, P)
        weights = segment_softmax(scores, mask, segment, segments)
        index = segment.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return x.new_zeros(x.shape[0], segments, x.shape[-1]).scatter_add(1, index, weights.unsqueeze(-1) * x)
