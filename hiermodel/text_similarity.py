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


def history_vectors(histories: Sequence[HistoryStats], unit_items: np.ndarray) -> np.ndarray:
    """(B, D) unit history vectors: the count-weighted mean of the history's unit item vectors (0 without history)."""
    out = np.zeros((len(histories), unit_items.shape[1]), dtype=unit_items.dtype)
    filled = [row for row, h in enumerate(histories) if h.items.size]
    if filled:  # the whole batch in a few array operations: small per-user BLAS calls stall when cores are shared
        items = np.concatenate([histories[row].items for row in filled])
        counts = np.concatenate([histories[row].count for row in filled]).astype(unit_items.dtype)
        starts = np.cumsum([0] + [histories[row].items.size for row in filled[:-1]])
        out[filled] = np.add.reduceat(unit_items[items] * counts[:, None], starts, axis=0)
    return unit_rows(out, unit_items.dtype)


def similarities(histories: Sequence[HistoryStats], unit_items: np.ndarray) -> np.ndarray:
    """(B, N) cosine of each history vector with every item's unit vector."""
    return history_vectors(histories, unit_items) @ unit_items.T
