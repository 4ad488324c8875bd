"""Non-neural baselines, all Rankers scored by evaluate_ranker, plus a string registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from hiermodel.data.dataset import Dataset
from hiermodel.data.split import Example, split_examples, train_popularity
from hiermodel.evaluation import Ranker
from hiermodel.history import DEFAULT_DECAY, example_histories, history_matrix

ZEROSHOT_POPULARITY_WEIGHT = 0.05  # the weight of the reference 'zero-shot MiniLM + 0.05·log(1+popularity)'


def _repeat_then_popular(primary: sp.csr_matrix, popularity: np.ndarray) -> np.ndarray:
    """Dense scores: history items (``primary``'s stored entries, values >= 0) by value, then the rest by popularity."""
    fill = popularity / (popularity.max(initial=0.0) + 1.0)  # in [0, 1): below every history item's 1 + value
    out = np.tile(fill, (primary.shape[0], 1))
    rows = np.repeat(np.arange(primary.shape[0]), np.diff(primary.indptr))
    out[rows, primary.indices] = 1.0 + primary.data
    return out


class GlobalPopularity:
    """G-Pop: every user gets the catalogue by number of training baskets containing the item."""

    name = "gpop"

    def __init__(self, *, dataset: Dataset, min_baskets: int = 3) -> None:
        self.popularity = train_popularity(dataset, min_baskets=min_baskets)

    def score(self, dataset: Dataset, examples: Sequence[Example]) -> np.ndarray:
        """The same popularity row for every example."""
        return np.tile(self.popularity, (len(examples), 1))


class PersonalPopularity:
    """P-Pop: the user's items by number of history baskets containing them, most recent first on ties; G-Pop fill."""

    name = "ppop"

    def __init__(self, *, dataset: Dataset, min_baskets: int = 3) -> None:
        self.popularity = train_popularity(dataset, min_baskets=min_baskets)

    def score(self, dataset: Dataset, examples: Sequence[Example]) -> np.ndarray:
        """Count plus a recency term in (0, 0.5], so recency only orders items of equal count."""
        histories = example_histories(dataset, examples)
        count = history_matrix(histories, "count", dataset.num_items)
        since = history_matrix(histories, "baskets_since_last", dataset.num_items)
        count.data += 0.5 / (1.0 + since.data)  # same sparsity pattern: both list each history's items
        return _repeat_then_popular(count, self.popularity)


class DecayedRepeat:
    """Recency-decayed repeat: the user's items by sum of decay**(baskets back); G-Pop fill."""

    name = "decayed-repeat"

    def __init__(self, *, dataset: Dataset, decay: float = DEFAULT_DECAY, min_baskets: int = 3) -> None:
        self.popularity = train_popularity(dataset, min_baskets=min_baskets)
        self.decay = decay

    def score(self, dataset: Dataset, examples: Sequence[Example]) -> np.ndarray:
        """Decayed count for history items, popularity below them."""
        histories = example_histories(dataset, examples, decay=self.decay)
        return _repeat_then_popular(history_matrix(histories, "decayed_count", dataset.num_items), self.popularity)


def training_basket_matrix(dataset: Dataset, *, min_baskets: int = 3) -> sp.csr_matrix:
    """Binary (baskets, items) matrix of the baskets train_popularity counts: no validation or test basket.

    Those are each user's first basket plus its training targets (see hiermodel.data.split).
    """
    rows: list[np.ndarray] = [user.baskets[0].items for user in dataset.users if user.baskets]
    for ex in split_examples(dataset, "train", min_baskets=min_baskets):
        rows.append(dataset.users[ex.user].baskets[ex.target].items)
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([r.size for r in rows])
    indices = np.concatenate(rows).astype(np.int64) if rows else np.empty(0, dtype=np.int64)
    data = np.ones(indices.size, dtype=np.float64)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), dataset.num_items))


class ItemKNN:
    """Item co-occurrence KNN: cosine over training baskets, user score = history-count-weighted sum of similarities."""

    name = "itemknn"

    def __init__(self, *, dataset: Dataset, min_baskets: int = 3) -> None:
        baskets = training_basket_matrix(dataset, min_baskets=min_baskets)
        co = (baskets.T @ baskets).tocsr()
        diagonal = co.diagonal()
        inv_norm = np.divide(1.0, np.sqrt(diagonal), out=np.zeros_like(diagonal), where=diagonal > 0)
        scale = sp.diags(inv_norm)
        similarity = (scale @ co @ scale).tocsr()
        similarity.setdiag(0.0)  # an item is not its own neighbour; repeats are the repeat baselines' job
        similarity.eliminate_zeros()
        self.similarity = similarity

    def score(self, dataset: Dataset, examples: Sequence[Example]) -> np.ndarray:
        """sum_j count_j * sim(j, i) over the history items j."""
        weights = history_matrix(example_histories(dataset, examples), "count", dataset.num_items)
        return (weights @ self.similarity).toarray()


class ZeroShotLM:
    """Zero-shot text baseline: cosine of each item with the history-count-weighted mean of unit item vectors."""

    def __init__(
        self,
        item_vectors: np.ndarray,
        *,
        popularity: np.ndarray | None = None,
        popularity_weight: float = 0.0,
        name: str = "zeroshot",
    ) -> None:
        vectors = np.asarray(item_vectors, dtype=np.float64)
        if vectors.ndim != 2:
            raise ValueError(f"ZeroShotLM: item_vectors must be (N, D), got shape {vectors.shape}")
        if popularity_weight and popularity is None:
            raise ValueError("ZeroShotLM: popularity_weight needs popularity (e.g. train_popularity(dataset))")
        if popularity is not None and len(popularity) != len(vectors):
            raise ValueError(f"ZeroShotLM: {len(popularity)} popularity counts for {len(vectors)} item vectors")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)  # (N, D)
        self.prior = popularity_weight * np.log1p(popularity) if popularity_weight else np.zeros(len(vectors))
        self.name = name

    def score(self, dataset: Dataset, examples: Sequence[Example]) -> np.ndarray:
        """Cosine(user vector, item vector) plus the popularity prior; 0 similarity without history."""
        if len(self.vectors) != dataset.num_items:
            raise ValueError(
                f"ZeroShotLM: {len(self.vectors)} item vectors for a catalogue of {dataset.num_items} items"
            )
        weights = history_matrix(example_histories(dataset, examples), "count", dataset.num_items)
        totals = np.asarray(weights.sum(axis=1))  # (B, 1)
        users = np.asarray(weights @ self.vectors) / np.maximum(totals, 1.0)  # (B, D) weighted mean
        norms = np.linalg.norm(users, axis=1, keepdims=True)
        users = np.divide(users, norms, out=np.zeros_like(users), where=norms > 0)
        return users @ self.vectors.T + self.prior  # (B, N)


def _zeroshot(dataset: Dataset, item_vectors: np.ndarray | None, *, with_popularity: bool, min_baskets: int) -> Ranker:
    """A ZeroShotLM, with the reference popularity prior or without."""
    name = "zeroshot-pop" if with_popularity else "zeroshot"
    if item_vectors is None:
        raise ValueError(f"baseline {name!r} needs item_vectors (one row per catalogue item)")
    if not with_popularity:
        return ZeroShotLM(item_vectors, name=name)
    return ZeroShotLM(
        item_vectors,
        popularity=train_popularity(dataset, min_baskets=min_baskets),
        popularity_weight=ZEROSHOT_POPULARITY_WEIGHT,
        name=name,
    )


def _gbdt(dataset: Dataset, item_vectors: np.ndarray | None, *, min_baskets: int) -> Ranker:
    """The gradient-boosted reranker (scikit-learn loads only when it is asked for)."""
    from hiermodel.gbdt_reranker import GBDTReranker

    return GBDTReranker(dataset=dataset, item_vectors=item_vectors, min_baskets=min_baskets)


_BUILDERS: dict[str, Callable[[Dataset, np.ndarray | None, int], Ranker]] = {
    "gpop": lambda d, v, m: GlobalPopularity(dataset=d, min_baskets=m),
    "ppop": lambda d, v, m: PersonalPopularity(dataset=d, min_baskets=m),
    "decayed-repeat": lambda d, v, m: DecayedRepeat(dataset=d, min_baskets=m),
    "itemknn": lambda d, v, m: ItemKNN(dataset=d, min_baskets=m),
    "zeroshot": lambda d, v, m: _zeroshot(d, v, with_popularity=False, min_baskets=m),
    "zeroshot-pop": lambda d, v, m: _zeroshot(d, v, with_popularity=True, min_baskets=m),
    "gbdt": lambda d, v, m: _gbdt(d, v, min_baskets=m),
}
BASELINE_NAMES = tuple(_BUILDERS)


def build_baseline(
    name: str, *, dataset: Dataset, item_vectors: np.ndarray | None = None, min_baskets: int = 3
) -> Ranker:
    """The baseline called ``name``, fitted on ``dataset``'s training baskets."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINE_NAMES)}")
    return builder(dataset, item_vectors, min_baskets)
