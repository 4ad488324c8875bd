"""Typed tensors that feed the model: a user's history and the candidates to score."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class HistoryBatch:
    """Histories of B users: H distinct history items, K baskets of up to M items each."""

    # each user's real tokens only, item after item (P = the most any user of the batch has): padding
    # to H items × T tokens would be 4-6 × as many rows, and the word level would compute on all of them
    token_states: torch.Tensor  # (B, P, D) backbone token states of the history items' tokens
    token_mask: torch.Tensor  # (B, P) bool, True for a real token
    token_slot: torch.Tensor  # (B, P) long, the history item (0 … H-1) each token belongs to
    token_position: torch.Tensor  # (B, P) long, the token's place in its item's text (0 … T-1)
    item_sentence: torch.Tensor  # (B, H, D) pooled backbone vectors of the history items
    item_mask: torch.Tensor  # (B, H) bool
    item_stats: torch.Tensor  # (B, H, S) repeat statistics of each history item
    basket_items: torch.Tensor  # (B, K, M) long, positions into the H history items
    basket_item_mask: torch.Tensor  # (B, K, M) bool
    basket_mask: torch.Tensor  # (B, K) bool
    basket_time: torch.Tensor  # (B, K, 2) log1p(days before target), log1p(baskets back)
    basket_slot: torch.Tensor  # (B, K) long, 0 = the most recent basket
    item_ids: torch.Tensor  # (B, H) long catalogue indices of the history items (-1 = padding)

    def to(self, device: torch.device | str) -> "HistoryBatch":
        return HistoryBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.item_mask.shape[0])


@dataclass
class CandidateBatch:
    """Candidates to score for each user: per-user lists (training) or the whole catalogue (ranking)."""

    sentence: torch.Tensor  # (B, C, D) per-user candidates, or (N, D) shared by all users
    features: torch.Tensor  # (B, C, F) repeat, popularity and user features of each (user, candidate)
    mask: torch.Tensor  # (B, C) bool, True for a real candidate
    labels: torch.Tensor | None = None  # (B, C) float, 1 for the target basket's items
    topic_targets: torch.Tensor | None = None  # (B, num_topics) label distribution of the target basket
