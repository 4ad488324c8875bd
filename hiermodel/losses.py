"""Training objectives: listwise softmax over a user's candidates, and a topic cross-entropy."""

from __future__ import annotations

import torch


def softmax_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-user cross-entropy between the softmax over candidates and the uniform target over positives.

    scores, labels, mask: (B, C); returns (B,). Users without a positive contribute 0.
    """
    logp = torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    logp = logp.masked_fill(~mask, 0.0)
    positives = labels.sum(-1)
    return -(labels * logp).sum(-1) / positives.clamp(min=1.0)


def topic_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-user cross-entropy against the target basket's topic distribution: (B, K), (B, K) -> (B,)."""
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1)
