"""The three interest levels, each built from the one below: z^(l) = M^(l)(z^(l-1)).

word (tokens of history items) -> sentence (items, pooled into baskets) -> paragraph (baskets in
time order). Every level returns its units (the input of the next level) and a user vector.
Only nn.Linear / nn.Embedding / nn.LayerNorm hold parameters, so Opacus hooks see every one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hiermodel.batch import HistoryBatch
from hiermodel.pooling import AttentionPool, masked_softmax


@dataclass
class LevelOutput:
    units: torch.Tensor | None  # (B, S, d) this level's units (items, baskets), the next level's input
    user: torch.Tensor  # (B, d) this level's user vector
    attention: torch.Tensor  # weights of the user pooling, shaped like the level's units


class WordLevel(nn.Module):
    """Tokens -> item vectors (attention over an item's words) and a word-level user vector.

    The tokens come packed per user (HistoryBatch): the item attention runs within each item's tokens,
    the user attention over all of a user's tokens, and the word attention is returned as (B, H, T)."""

    def __init__(self, backbone_dim: int, dim: int, *, max_tokens: int, build_items: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(backbone_dim, dim)
        self.max_tokens = max_tokens
        # item vectors feed the sentence level; a word-only model has no use for them
        self.item_pool = AttentionPool(dim) if build_items else None
        self.user_pool = AttentionPool(dim)

    def forward(self, history: HistoryBatch) -> LevelOutput:
        x = torch.tanh(self.proj(history.token_states))  # (B, P, d)
        b, h = history.item_mask.shape
        mask, slot = history.token_mask, history.token_slot
        items = self.item_pool.pool_segments(x, mask, slot, h) if self.item_pool is not None else None  # (B, H, d)
        user, weights = self.user_pool(x, mask)
        # back to (B, H, T) for explanations: each weight at its item and token
        if history.token_position.numel() and int(history.token_position.max()) >= self.max_tokens:
            raise ValueError(f"a token at position {int(history.token_position.max())}, but the model reads "
                             f"{self.max_tokens} tokens an item: the encodings and the model config disagree")
        where = slot * self.max_tokens + history.token_position
        attention = weights.new_zeros(b, h * self.max_tokens).scatter_add(1, where, weights * mask)
        return LevelOutput(units=items, user=user, attention=attention.view(b, h, self.max_tokens))


class SentenceLevel(nn.Module):
    """Item vectors (from words + the backbone's sentence vector) -> basket vectors and a user vector."""

    def __init__(self, backbone_dim: int, dim: int, stats_dim: int, *, build_baskets: bool = True) -> None:
        super().__init__()
        self.sentence_proj = nn.Linear(backbone_dim, dim)
        self.mix = nn.Linear(2 * dim, dim)
        self.basket_pool = AttentionPool(dim) if build_baskets else None  # only the paragraph level needs them
        self.user_pool = AttentionPool(dim, extra_dim=stats_dim)  # how often/recently steers weights

    def forward(self, history: HistoryBatch, word_items: torch.Tensor) -> LevelOutput:
        sentence = self.sentence_proj(history.item_sentence)  # (B, H, d)
        items = torch.tanh(self.mix(torch.cat([word_items, sentence], dim=-1)))  # (B, H, d)
        baskets = None
        if self.basket_pool is not None:
            b, k, m = history.basket_items.shape
            index = history.basket_items.reshape(b, k * m, 1).expand(-1, -1, items.shape[-1])
            members = torch.gather(items, 1, index).view(b, k, m, -1)  # (B, K, M, d)
            baskets, _ = self.basket_pool(members, history.basket_item_mask)  # (B, K, d)
        user, weights = self.user_pool(items, history.item_mask, extra=history.item_stats)
        return LevelOutput(units=baskets, user=user, attention=weights)


class ParagraphLevel(nn.Module):
    """Basket vectors in time order -> one time-aware self-attention layer -> a user vector."""

    def __init__(self, dim: int, max_baskets: int) -> None:
        super().__init__()
        self.slot = nn.Embedding(max_baskets, dim)
        self.time = nn.Linear(2, dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.user_pool = AttentionPool(dim, extra_dim=2)

    def forward(self, history: HistoryBatch, baskets: torch.Tensor) -> LevelOutput:
        x = baskets + self.slot(history.basket_slot) + self.time(history.basket_time)  # (B, K, d)
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1])  # (B, K, K)
        attn = masked_softmax(scores, history.basket_mask.unsqueeze(1).expand_as(scores))
        x = self.norm(x + self.out(attn @ self.value(x)))
        user, weights = self.user_pool(x, history.basket_mask, extra=history.basket_time)
        return LevelOutput(units=x, user=user, attention=weights)
