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
    counts = np.zeros((len(histories), unit_items.shape[0]), dtype=unit_items.dtype)
    for row, h in enumerate(histories):
        counts[row, h.items] = h.count
    return unit_rows(counts @ unit_items, unit_items.dtype)  # one product for the batch, not one per user


def similarities(histories: Sequence[HistoryStats], unit_items: np.ndarray) -> np.ndarray:
    """(B, N) cosine of each history vector with every item's unit vector."""
    return history_vectors(histories, unit_items) @ unit_items.T
