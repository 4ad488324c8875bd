"""Ranking metrics, one small function each, plus the top-k helper whose tie rule they all share.

Tie rule everywhere: among equal scores the lower item index ranks first. Scores must not be NaN;
-inf is allowed (it is how an item is excluded from a ranking).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from scipy.stats import rankdata

Relevant = Collection[int] | np.ndarray


def _relevant_array(relevant: Relevant) -> np.ndarray:
    """Relevant items as a unique int64 array."""
    arr = relevant if isinstance(relevant, np.ndarray) else np.fromiter(relevant, dtype=np.int64, count=len(relevant))
    return np.unique(arr.astype(np.int64, copy=False))


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of (B, N) scores, the indices of the k highest, best first; ties: lower index first.

    argpartition finds the k-th largest value; every item above it is taken, and of the items equal to
    it the lowest-indexed ones, so the cut itself obeys the tie rule too. k is clipped to N.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"top_k_indices: scores must be (B, N), got shape {scores.shape}")
    b, n = scores.shape
    k = min(int(k), n)
    if k <= 0 or b == 0:
        return np.empty((b, max(k, 0)), dtype=np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)  # (B, 1)
    above = scores > kth
    at = scores == kth
    room = k - above.sum(axis=1, keepdims=True)
    chosen = above | (at & (np.cumsum(at, axis=1) <= room))
    idx = np.nonzero(chosen)[1].reshape(b, k)  # ascending index within each row
    order = np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int64, copy=False)


def recall_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> float:
    """Share of the relevant items found in the first k of ``ranked``; 0.0 when nothing is relevant."""
    rel = _relevant_array(relevant)
    if rel.size == 0:
        return 0.0
    hits = np.isin(np.asarray(ranked)[:k], rel).sum()
    return float(hits) / rel.size


def ndcg_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> float:
    """Binary-relevance NDCG@k, ideal DCG over min(|relevant|, k) hits; 0.0 when nothing is relevant."""
    rel = _relevant_array(relevant)
    if rel.size == 0 or k <= 0:
        return 0.0
    top = np.asarray(ranked)[:k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = discounts[: top.size][np.isin(top, rel)].sum()
    idcg = discounts[: min(rel.size, k)].sum()
    return float(dcg / idcg)


def reciprocal_rank(scores: np.ndarray, relevant: Relevant) -> float:
    """1 / rank of the first relevant item in the full ranking of 1-D ``scores``; 0.0 if none.

    Takes scores, not a ranking: the rank follows from counting (O(N)), so no full sort is needed.
    """
    scores = np.asarray(scores)
    rel = _relevant_array(relevant)
    if rel.size == 0:
        return 0.0
    rel_scores = scores[rel]
    best = int(np.argmax(rel_scores))  # first maximum = lowest relevant index, as the tie rule ranks it
    s, item = rel_scores[best], int(rel[best])
    rank = 1 + int((scores > s).sum()) + int((scores[:item] == s).sum())
    return 1.0 / rank


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (ties count half, as sklearn's roc_auc_score); NaN when labels are all one class."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks handle ties
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _impression_order(scores: np.ndarray) -> np.ndarray:
    """Candidate positions by descending score, ties: lower position first."""
    return top_k_indices(np.asarray(scores)[None, :], len(scores))[0]


def mind_mrr(labels: np.ndarray, scores: np.ndarray) -> float:
    """MIND's MRR: sum(y_true / rank) / sum(y_true) over one impression; 0.0 without clicks."""
    y = np.asarray(labels, dtype=np.float64)[_impression_order(scores)]
    total = y.sum()
    if total == 0:
        return 0.0
    return float((y / np.arange(1, y.size + 1)).sum() / total)


def mind_ndcg_at_k(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """MIND's nDCG@k over one impression (binary clicks, so gains 2**y - 1 = y)."""
    return ndcg_at_k(_impression_order(scores), np.flatnonzero(np.asarray(labels)), k)
