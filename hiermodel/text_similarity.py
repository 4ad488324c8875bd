"""Zero-shot text similarity in the frozen backbone's own space: how close a candidate is to a history.

Nothing here is trained, so it is a text signal that DP-SGD's noise cannot reach: the model only
learns how much to weigh it (one wide-feature weight), and the gradient-boosted reranker reads it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hiermodel.history import HistoryStats


def unit_rows(vectors: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Each row scaled to unit length (all-zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=dtype)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


GATHER_ROWS = 8192


def history_vectors(histories: Sequence[HistoryStats], unit_items: np.ndarray) -> np.ndarray:
    """(B, D) unit history vectors: the count-weighted mean of the history's unit item vectors (0 without history)."""
    out = np.zeros((len(histories), unit_items.shape[1]), dtype=unit_items.dtype)
    filled = [row for row, h in enumerate(histories) if h.items.size]
    # a few array operations per chunk of users, not a small BLAS call per user (those stall when the
    # cores are shared); chunks keep the gathered rows to about GATHER_ROWS × D values
    start = 0
    while start < len(filled):
        end, size = start, 0
        while end < len(filled) and (end == start or size + histories[filled[end]].items.size <= GATHER_ROWS):
            size += histories[filled[end]].items.size
            end += 1
        rows = filled[start:end]
        items = np.concatenate([histories[row].items for row in rows])
        counts = np.concatenate([histories[row].count for row in rows]).astype(unit_items.dtype)
        offsets = np.cumsum([0] + [histories[row].items.size for row in rows[:-1]])
        out[rows] = np.add.reduceat(unit_items[items] * counts[:, None], offsets, axis=0)
        start = end
    return unit_rows(out, unit_items.dtype)


def similarities(histories: Sequence[HistoryStats], unit_items: np.ndarray) -> np.ndarray:
    """(B, N) cosine of each history vector with every item's unit vector."""
    return history_vectors(histories, unit_items) @ unit_items.T
