"""Gradient-boosted reranker: the strongest non-neural yardstick of ../shared/BASELINES.md.

Nine hand-made features per (user, candidate item), all from the baskets before the target:
repeat statistics of the item in the history, the user's basket count and recency, the item's
log popularity, and the zero-shot LM similarity of the item to the history. A pointwise
HistGradientBoosting classifier (is the candidate in the target basket?) is fitted on training
targets only; at test time every catalogue item gets its features, so it ranks the full catalogue.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from hiermodel.data.dataset import Dataset
from hiermodel.data.split import Example, train_popularity, train_targets_by_user
from hiermodel.history import HistoryStats, example_histories
from hiermodel.text_similarity import similarities, unit_rows

# One OpenMP thread: on cores shared with other jobs, scikit-learn's spinning OpenMP workers made fitting
# and scoring several times slower than a single thread (measured on the 2-core bench machine).
THREADS = 1

FEATURES = (
    "count",
    "decayed_count",
    "days_since_last_bought",
    "in_last_basket",
    "baskets_so_far",
    "log_popularity",
    "lm_similarity",
    "share_of_baskets",
    "days_since_last_basket",
)


def candidate_features(
    history: HistoryStats, items: np.ndarray, *, log_popularity: np.ndarray, similarity: np.ndarray
) -> np.ndarray:
    """(len(items), 9) float64 features in FEATURES order; ``log_popularity`` and ``similarity`` are per catalogue item.

    Items never bought get count 0 and NaN days-since-last-bought (HistGradientBoosting routes missing
    values on their own branch, which "never" is, rather than a made-up large number).
    """
    items = np.asarray(items, dtype=np.int64)
    out = np.zeros((items.size, len(FEATURES)), dtype=np.float64)
    out[:, 2] = np.nan
    if history.items.size:
        pos = np.minimum(np.searchsorted(history.items, items), history.items.size - 1)
        present = history.items[pos] == items
        hit = pos[present]
        out[present, 0] = history.count[hit]
        out[present, 1] = history.decayed_count[hit]
        out[present, 2] = history.days_since_last[hit]
        out[present, 3] = history.in_last_basket[hit]
    out[:, 4] = history.num_baskets
    out[:, 5] = log_popularity[items]
    out[:, 6] = similarity[items]
    out[:, 7] = out[:, 0] / max(history.num_baskets, 1)
    out[:, 8] = history.days_since_last_basket  # NaN without history
    return out


class GBDTReranker:
    """HistGradientBoosting over repeat features and zero-shot similarity; scores the whole catalogue.

    Training rows: for each user, its last ``targets_per_user`` training targets; candidates are the
    history items, the ``popular_candidates`` most popular items and the ``similar_candidates`` items
    most similar to the history (chosen without looking at the target, so the rows are an unbiased
    sample of what test-time ranking sees near the top).
    """

    name = "gbdt"

    def __init__(
        self,
        *,
        dataset: Dataset,
        item_vectors: np.ndarray,
        min_baskets: int = 3,
        targets_per_user: int = 2,
        popular_candidates: int = 100,
        similar_candidates: int = 100,
        max_iter: int = 300,
        learning_rate: float = 0.05,
        seed: int = 0,
    ) -> None:
        from sklearn.ensemble import HistGradientBoostingClassifier

        if item_vectors is None:
            raise ValueError("baseline 'gbdt' needs item_vectors (one row per catalogue item)")
        if len(item_vectors) != dataset.num_items:
            raise ValueError(f"GBDTReranker: {len(item_vectors)} item vectors for a catalogue of {dataset.num_items} items")
        self.unit_items = unit_rows(item_vectors)
        self.popularity = train_popularity(dataset, min_baskets=min_baskets)
        self.log_popularity = np.log1p(self.popularity)
        targets = train_targets_by_user(dataset, min_baskets=min_baskets)
        examples = [Example(u, t) for u, ts in targets.items() for t in ts[-targets_per_user:]]
        if not examples:
            raise ValueError("baseline 'gbdt' needs training targets: every user has a single basket")
        features, labels = self._training_rows(dataset, examples, popular_candidates, similar_candidates)
        self.training_rows = len(labels)
        self.model = HistGradientBoostingClassifier(
            max_iter=max_iter,
            learning_rate=learning_rate,
            max_leaf_nodes=31,
            min_samples_leaf=50,
            l2_regularization=1.0,
            # early stopping needs both classes in its held-out tenth; tiny data falls back to all iterations
            early_stopping=len(labels) >= 10_000 and labels.sum() >= 100,
            validation_fraction=0.1,
            n_iter_no_change=20,
            random_state=seed,
        )
        if labels.min() == labels.max():  # one class only (tiny data): constant scores below every feature
            self.model = None
        else:
            with threadpool_limits(THREADS, user_api="openmp"):
                self.model.fit(features, labels)

    def _training_rows(self, dataset: Dataset, examples: list[Example], popular: int, similar: int):
        top_popular = np.argsort(-self.popularity, kind="stable")[:popular]
        rows, labels = [], []
        for start in range(0, len(examples), 512):
            batch = examples[start : start + 512]
            histories = example_histories(dataset, batch)
            sims = similarities(histories, self.unit_items)  # (B, N)
            for ex, h, sim in zip(batch, histories, sims):
                target = np.unique(dataset.users[ex.user].baskets[ex.target].items)
                # the target basket itself is among the training baskets popularity counts: take it out
                log_pop = self.log_popularity.copy()
                log_pop[target] = np.log1p(np.maximum(self.popularity[target] - 1.0, 0.0))
                close = np.argpartition(-sim, min(similar, sim.size - 1))[:similar] if similar else np.empty(0, np.int64)
                candidates = np.unique(np.concatenate([h.items, top_popular, close]))
                rows.append(candidate_features(h, candidates, log_popularity=log_pop, similarity=sim))
                labels.append(np.isin(candidates, target))
        return np.concatenate(rows), np.concatenate(labels).astype(np.int64)

    def score(self, dataset: Dataset, examples: Sequence[Example]) -> np.ndarray:
        """(B, N) log-odds of every catalogue item being in the target basket."""
        if len(self.unit_items) != dataset.num_items:
            raise ValueError(f"GBDTReranker: fitted on {len(self.unit_items)} items, the catalogue has {dataset.num_items}")
        histories = example_histories(dataset, examples)
        sims = similarities(histories, self.unit_items)
        if self.model is None:
            return np.zeros((len(examples), dataset.num_items))
        everything = np.arange(dataset.num_items, dtype=np.int64)
        features = np.concatenate([
            candidate_features(h, everything, log_popularity=self.log_popularity, similarity=sim)
            for h, sim in zip(histories, sims)
        ])
        with threadpool_limits(THREADS, user_api="openmp"):
            return self.model.decision_function(features).reshape(len(examples), dataset.num_items)
