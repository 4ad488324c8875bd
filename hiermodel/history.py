"""Per (user, target basket) history statistics, from the baskets before the target only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from hiermodel.data.dataset import Dataset, User
from hiermodel.data.split import Example

DEFAULT_DECAY = 0.9
SECONDS_PER_DAY = 86_400.0

ItemField = Literal["count", "decayed_count", "baskets_since_last", "days_since_last", "in_last_basket"]


@dataclass(frozen=True)
class HistoryStats:
    """What a user bought before one target basket: per distinct item (ascending index) and overall."""

    items: np.ndarray  # (M,) int64, distinct history items, ascending
    count: np.ndarray  # (M,) int64, history baskets containing the item
    decayed_count: np.ndarray  # (M,) float64, sum of decay**(baskets back); the last basket counts decay**0
    baskets_since_last: np.ndarray  # (M,) int64, history baskets after the last one with the item (0 = last)
    days_since_last: np.ndarray  # (M,) float64, days from the last basket with the item to the target
    in_last_basket: np.ndarray  # (M,) bool
    num_baskets: int
    days_since_last_basket: float  # NaN without history
    decay: float

    def dense(self, field: ItemField, num_items: int) -> np.ndarray:
        """One per-item field as a (num_items,) float64 vector, 0 for items not in the history."""
        out = np.zeros(num_items, dtype=np.float64)
        out[self.items] = getattr(self, field)
        return out


def user_history(user: User, target: int, *, decay: float = DEFAULT_DECAY, now: float | None = None) -> HistoryStats:
    """Statistics of ``user.baskets[:target]``, with days measured to ``now`` (default: the target's timestamp).

    ``target`` may be ``len(user.baskets)`` (the next, unseen basket) when ``now`` is given.
    """
    n = len(user.baskets)
    if not 0 <= target <= n or (target == n and now is None):
        raise ValueError(f"user_history: target {target} out of range for user {user.user_id!r} with {n} baskets")
    when = float(user.baskets[target].timestamp if now is None else now)
    history = user.baskets[:target]
    if not history:
        return _empty(decay)
    sizes = np.fromiter((b.items.size for b in history), dtype=np.int64, count=target)
    flat = np.concatenate([b.items for b in history]).astype(np.int64, copy=False)
    position = np.repeat(np.arange(target, dtype=np.int64), sizes)
    items, inverse = np.unique(flat, return_inverse=True)
    m = items.size
    back = (target - 1) - position
    last = np.full(m, -1, dtype=np.int64)
    np.maximum.at(last, inverse, position)
    times = np.fromiter((b.timestamp for b in history), dtype=np.float64, count=target)
    since = (target - 1) - last
    return HistoryStats(
        items=items,
        count=np.bincount(inverse, minlength=m).astype(np.int64),
        decayed_count=np.bincount(inverse, weights=decay ** back.astype(np.float64), minlength=m),
        baskets_since_last=since,
        days_since_last=(when - times[last]) / SECONDS_PER_DAY,
        in_last_basket=since == 0,
        num_baskets=target,
        days_since_last_basket=(when - times[-1]) / SECONDS_PER_DAY,
        decay=decay,
    )


def _empty(decay: float) -> HistoryStats:
    """The statistics of an empty history."""
    none_int, none_float = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    return HistoryStats(
        items=none_int,
        count=none_int,
        decayed_count=none_float,
        baskets_since_last=none_int,
        days_since_last=none_float,
        in_last_basket=np.empty(0, dtype=bool),
        num_baskets=0,
        days_since_last_basket=float("nan"),
        decay=decay,
    )


def example_histories(
    dataset: Dataset, examples: Sequence[Example], *, decay: float = DEFAULT_DECAY
) -> list[HistoryStats]:
    """The history of every example, in order."""
    return [user_history(dataset.users[ex.user], ex.target, decay=decay) for ex in examples]


def history_matrix(histories: Sequence[HistoryStats], field: ItemField, num_items: int) -> sp.csr_matrix:
    """One per-item field of many histories as a sparse (len(histories), num_items) float64 matrix."""
    indptr = np.zeros(len(histories) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([h.items.size for h in histories])
    if not histories or indptr[-1] == 0:
        return sp.csr_matrix((len(histories), num_items), dtype=np.float64)
    indices = np.concatenate([h.items for h in histories])
    data = np.concatenate([np.asarray(getattr(h, field), dtype=np.float64) for h in histories])
    return sp.csr_matrix((data, indices, indptr), shape=(len(histories), num_items))
