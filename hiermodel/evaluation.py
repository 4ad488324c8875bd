"""One evaluation code path for every ranker: full-catalogue ranking, plus MIND impressions where shown."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from hiermodel import metrics
from hiermodel.data.dataset import Dataset
from hiermodel.data.split import Example, split_examples
from hiermodel.history import HistoryStats, example_histories

IMPRESSION_NDCG_KS = (5, 10)


@runtime_checkable
class Ranker(Protocol):
    """Scores the whole catalogue for each example, higher is better, from baskets before the target only."""

    name: str

    def score(self, dataset: Dataset, examples: Sequence[Example]) -> np.ndarray:
        """(len(examples), dataset.num_items) float scores."""
        ...


class _Means:
    """Running means of named per-user values, each with its own count."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: float) -> None:
        self.sums[name] += value
        self.counts[name] += 1

    def mean(self, name: str) -> float:
        """The mean, 0.0 when nothing was added."""
        return self.sums[name] / self.counts[name] if self.counts[name] else 0.0


def evaluate_ranker(
    ranker: Ranker,
    dataset: Dataset,
    *,
    split: str = "test",
    ks: Sequence[int] = (10, 20),
    batch_size: int = 256,
    min_baskets: int = 3,
) -> dict[str, float]:
    """Mean metrics of ``ranker`` over the split's examples, scored ``batch_size`` at a time.

    Full ranking: recall@k, ndcg@k, mrr over users with a non-empty target ('users'); explore_recall@k
    ranks only items outside the history and counts only new target items ('explore_users' have some).
    Targets with shown candidates (MIND) add impression_auc / impression_mrr / impression_ndcg@5, @10
    over those candidates, clicked = the target's items ('impressions'; AUC skips one-class ones).
    """
    if batch_size < 1:
        raise ValueError(f"evaluate_ranker: batch_size must be >= 1, got {batch_size}")
    ks = sorted(set(int(k) for k in ks))
    examples = split_examples(dataset, split, min_baskets=min_baskets)
    means = _Means()
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        scores = _checked_scores(ranker, dataset, batch)
        _add_batch(means, dataset=dataset, batch=batch, scores=scores, ks=ks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = means.mean(f"recall@{k}")
        out[f"ndcg@{k}"] = means.mean(f"ndcg@{k}")
    out["mrr"] = means.mean("mrr")
    for k in ks:
        out[f"explore_recall@{k}"] = means.mean(f"explore_recall@{k}")
    out["users"] = means.counts["mrr"]
    out["explore_users"] = means.counts[f"explore_recall@{ks[-1]}"] if ks else 0
    if means.counts["impression_mrr"]:
        for name in ("impression_auc", "impression_mrr", *(f"impression_ndcg@{k}" for k in IMPRESSION_NDCG_KS)):
            out[name] = means.mean(name)
        out["impressions"] = means.counts["impression_mrr"]
    return out


def _checked_scores(ranker: Ranker, dataset: Dataset, batch: Sequence[Example]) -> np.ndarray:
    """The ranker's scores for a batch, as float64, after checking shape and NaN."""
    scores = np.asarray(ranker.score(dataset, batch), dtype=np.float64)
    expected = (len(batch), dataset.num_items)
    if scores.shape != expected:
        raise ValueError(f"ranker {ranker.name!r}: scores have shape {scores.shape}, expected {expected}")
    if np.isnan(scores).any():
        raise ValueError(f"ranker {ranker.name!r}: scores contain NaN")
    return scores


def _add_batch(
    means: _Means,
    *,
    dataset: Dataset,
    batch: Sequence[Example],
    scores: np.ndarray,
    ks: Sequence[int],
) -> None:
    """Add one batch's per-user metrics to the running means."""
    histories = example_histories(dataset, batch)
    k_max = max(ks, default=0)
    top = metrics.top_k_indices(scores, k_max)
    explore_top = metrics.top_k_indices(_without_history(scores, histories), k_max)
    for row, (ex, history) in enumerate(zip(batch, histories)):
        target = dataset.users[ex.user].baskets[ex.target]
        relevant = np.unique(target.items)
        if relevant.size:
            for k in ks:
                means.add(f"recall@{k}", metrics.recall_at_k(top[row], relevant, k))
                means.add(f"ndcg@{k}", metrics.ndcg_at_k(top[row], relevant, k))
            means.add("mrr", metrics.reciprocal_rank(scores[row], relevant))
        new = np.setdiff1d(relevant, history.items, assume_unique=True)
        if new.size:
            for k in ks:
                means.add(f"explore_recall@{k}", metrics.recall_at_k(explore_top[row], new, k))
        if target.shown is not None and target.shown.size:
            _add_impression(means, labels=np.isin(target.shown, relevant), scores=scores[row, target.shown])


def _without_history(scores: np.ndarray, histories: Sequence[HistoryStats]) -> np.ndarray:
    """A copy of the scores with every history item at -inf, so only new items are ranked."""
    out = scores.copy()
    rows = np.repeat(np.arange(len(histories)), [h.items.size for h in histories])
    cols = np.concatenate([h.items for h in histories]) if histories else np.empty(0, dtype=np.int64)
    out[rows, cols] = -np.inf
    return out


def _add_impression(means: _Means, *, labels: np.ndarray, scores: np.ndarray) -> None:
    """Add one impression's MIND metrics."""
    value = metrics.auc(labels, scores)
    if not np.isnan(value):
        means.add("impression_auc", value)
    means.add("impression_mrr", metrics.mind_mrr(labels, scores))
    for k in IMPRESSION_NDCG_KS:
        means.add(f"impression_ndcg@{k}", metrics.mind_ndcg_at_k(labels, scores, k))
