"""Builds model batches for (user, target basket) examples from the baskets before the target only.

Per (user, candidate) features, in this order (the repeat block first, so the no-repeat ablation can
blank it): log1p(count), share of history baskets, log1p(decayed count), 1/(1+baskets since last),
log1p(days since last)/6, in-history flag; then popularity: log1p(training baskets with the item)
and log1p(baskets with it in the 30 days before the target), each normalised (a private site reads
both from its DP release instead: hiermodel.private_popularity); then user features:
log1p(history baskets)/5, log1p(days since last basket)/6, log1p(distinct items)/6, log1p(mean basket size)/4;
last, with model.text-similarity on: the candidate's zero-shot cosine to the history in the
frozen backbone's space (hiermodel.text_similarity), a text signal with no trainable values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from hiermodel.batch import CandidateBatch, HistoryBatch
from hiermodel.data.dataset import Dataset
from hiermodel.data.split import Example, train_popularity
from hiermodel.encoding_cache import ItemEncodings
from hiermodel.history import HistoryStats, user_history
from hiermodel.model import HierModelConfig
from hiermodel.text_similarity import similarities, unit_rows

NUM_REPEAT_FEATURES = 6
NUM_USER_FEATURES = 4
NUM_POPULARITY_FEATURES = 2
NUM_FEATURES = NUM_REPEAT_FEATURES + NUM_POPULARITY_FEATURES + NUM_USER_FEATURES + 1  # + the text similarity
RECENT_DAYS = 30.0
MAX_TIME_BINS = 1024
NEGATIVE_MODES = ("sampled", "catalogue")


def repeat_features(stats: HistoryStats) -> np.ndarray:
    """(M, 6) repeat features of each distinct history item."""
    if stats.items.size == 0:
        return np.zeros((0, NUM_REPEAT_FEATURES), dtype=np.float32)
    return np.stack(
        [
            np.log1p(stats.count),
            stats.count / max(stats.num_baskets, 1),
            np.log1p(stats.decayed_count),
            1.0 / (1.0 + stats.baskets_since_last),
            np.log1p(np.maximum(stats.days_since_last, 0.0)) / 6.0,
            np.ones(stats.items.size),
        ],
        axis=1,
    ).astype(np.float32)


def user_features(stats: HistoryStats, mean_basket_size: float) -> np.ndarray:
    days = stats.days_since_last_basket
    return np.array(
        [
            np.log1p(stats.num_baskets) / 5.0,
            np.log1p(max(days, 0.0) if np.isfinite(days) else 0.0) / 6.0,
            np.log1p(stats.items.size) / 6.0,
            np.log1p(mean_basket_size) / 4.0,
        ],
        dtype=np.float32,
    )


class FeatureBuilder:
    """Turns examples into HistoryBatch / CandidateBatch tensors for one dataset (one site's data)."""

    def __init__(
        self,
        *,
        dataset: Dataset,
        encodings: ItemEncodings,
        config: HierModelConfig,
        popularity: "Popularity | np.ndarray | None" = None,
        decay: float = 0.9,
    ) -> None:
        """``popularity``: where the two popularity features come from, by default PlainPopularity
        of the dataset (an array: PlainPopularity with those counts); a private site passes its DP
        release (hiermodel.private_popularity), or an empty one before it has made it."""
        if encodings.num_items != dataset.num_items:
            raise ValueError(f"encodings cover {encodings.num_items} items, the dataset has {dataset.num_items}")
        self.dataset = dataset
        self.encodings = encodings
        self.config = config
        self.decay = decay
        if popularity is None or isinstance(popularity, np.ndarray):
            popularity = PlainPopularity(dataset, popularity)
        self.set_popularity(popularity)
        self.topics = self._topic_index(config.topic_label)
        self.num_features = num_features(config)
        self.unit_items = unit_rows(encodings.sentence.float().numpy(), np.float32) if config.text_similarity else None

    def set_popularity(self, popularity: "Popularity") -> None:
        if popularity.num_items != self.dataset.num_items:
            raise ValueError(f"popularity covers {popularity.num_items} items, the dataset has {self.dataset.num_items}")
        self.popularity = popularity

    def _topic_index(self, label: str | None) -> np.ndarray | None:
        if not label:
            return None
        values = self.dataset.catalogue.labels.get(label)
        if values is None:
            raise ValueError(f"topic label {label!r} is not in the catalogue (has: {sorted(self.dataset.catalogue.labels)})")
        _, index = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
        return index

    def target_time(self, example: Example) -> float:
        """When the target basket happens; for the next, unseen basket (target = len), the last one's time."""
        baskets = self.dataset.users[example.user].baskets
        return baskets[min(example.target, len(baskets) - 1)].timestamp

    def stats(self, example: Example) -> HistoryStats:
        user = self.dataset.users[example.user]
        return user_history(user, example.target, decay=self.decay, now=self.target_time(example))

    # --- histories -------------------------------------------------------------------------

    def history_batch(self, examples: Sequence[Example]) -> tuple[HistoryBatch, list[HistoryStats]]:
        c = self.config
        b, h, k, m = len(examples), c.max_history_items, c.max_baskets, c.max_basket_items
        item_ids = np.full((b, h), -1, dtype=np.int64)
        item_stats = np.zeros((b, h, NUM_REPEAT_FEATURES), dtype=np.float32)
        basket_items = np.zeros((b, k, m), dtype=np.int64)
        basket_item_mask = np.zeros((b, k, m), dtype=bool)
        basket_mask = np.zeros((b, k), dtype=bool)
        basket_time = np.zeros((b, k, 2), dtype=np.float32)
        basket_slot = np.zeros((b, k), dtype=np.int64)
        all_stats = []
        for row, ex in enumerate(examples):
            stats = self.stats(ex)
            all_stats.append(stats)
            # keep the H most recently bought distinct items (ties: more often bought first)
            order = np.lexsort((-stats.count, stats.baskets_since_last))[:h]
            kept = stats.items[order]
            item_ids[row, : kept.size] = kept
            item_stats[row, : kept.size] = repeat_features(stats)[order]
            position = {int(item): p for p, item in enumerate(kept)}
            baskets = self.dataset.users[ex.user].baskets[max(0, ex.target - k) : ex.target]
            when = self.target_time(ex)
            for slot, basket in enumerate(baskets):
                members = [position[i] for i in basket.items.tolist() if i in position][:m]
                basket_items[row, slot, : len(members)] = members
                basket_item_mask[row, slot, : len(members)] = True
                basket_mask[row, slot] = bool(members)
                back = len(baskets) - 1 - slot
                basket_slot[row, slot] = back
                basket_time[row, slot] = (np.log1p(max(when - basket.timestamp, 0.0) / 86400.0), np.log1p(back))
        safe_ids = np.where(item_ids >= 0, item_ids, 0)
        ids = torch.from_numpy(safe_ids)
        item_mask = torch.from_numpy(item_ids >= 0)
        tokens = self._packed_tokens(ids, item_mask)
        batch = HistoryBatch(
            **tokens,
            item_sentence=self.encodings.sentence[ids].float(),
            item_mask=item_mask,
            item_stats=torch.from_numpy(item_stats),
            basket_items=torch.from_numpy(basket_items),
            basket_item_mask=torch.from_numpy(basket_item_mask),
            basket_mask=torch.from_numpy(basket_mask),
            basket_time=torch.from_numpy(basket_time),
            basket_slot=torch.from_numpy(basket_slot),
            item_ids=torch.from_numpy(item_ids),
        )
        return batch, all_stats

    def _packed_tokens(self, ids: torch.Tensor, item_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The history items' real tokens, packed per user in item then token order (HistoryBatch)."""
        present = (self.encodings.token_mask[ids] & item_mask.unsqueeze(-1)).flatten(1)  # (B, H·T)
        per_item = self.encodings.token_mask.shape[1]
        counts = present.sum(1)
        users, flat = present.nonzero(as_tuple=True)  # row-major: by user, then item, then token
        rank = torch.arange(users.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        slot, position = flat // per_item, flat % per_item
        shape = (ids.shape[0], max(int(counts.max()) if counts.numel() else 0, 1))
        states = self.encodings.token_states
        packed = torch.zeros(*shape, states.shape[-1])
        packed[users, rank] = states.reshape(-1, states.shape[-1])[ids[users, slot] * per_item + position].float()
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[users, rank] = True
        token_slot = torch.zeros(shape, dtype=torch.long)
        token_slot[users, rank] = slot
        token_position = torch.zeros(shape, dtype=torch.long)
        token_position[users, rank] = position
        return {"token_states": packed, "token_mask": mask, "token_slot": token_slot, "token_position": token_position}

    # --- candidates ------------------------------------------------------------------------

    def _similarities(self, all_stats: Sequence[HistoryStats]) -> np.ndarray | None:
        """(B, N) zero-shot similarities of a batch's histories to every item (model.text-similarity), or None."""
        return None if self.unit_items is None else similarities(all_stats, self.unit_items)

    def _features(self, stats: HistoryStats, example: Example, candidates: np.ndarray,
                  similarity: np.ndarray | None = None) -> np.ndarray:
        """(C, F) features of the candidate items for one example; ``similarity`` (N,) is its row of
        _similarities, best computed for the whole batch at once (None: computed here)."""
        out = np.zeros((candidates.size, self.num_features), dtype=np.float32)
        if stats.items.size:
            pos = np.searchsorted(stats.items, candidates).clip(max=stats.items.size - 1)
            hit = stats.items[pos] == candidates
            out[hit, :NUM_REPEAT_FEATURES] = repeat_features(stats)[pos[hit]]
        if self.config.use_popularity:
            overall, recent = self.popularity.at(self.target_time(example))
            out[:, NUM_REPEAT_FEATURES] = overall[candidates]
            out[:, NUM_REPEAT_FEATURES + 1] = recent[candidates]
        user_start = NUM_REPEAT_FEATURES + NUM_POPULARITY_FEATURES
        out[:, user_start : user_start + NUM_USER_FEATURES] = user_features(stats, self._mean_basket_size(example))
        if self.unit_items is not None:
            out[:, -1] = (similarity if similarity is not None else self._similarities([stats])[0])[candidates]
        return out

    def _mean_basket_size(self, example: Example) -> float:
        baskets = self.dataset.users[example.user].baskets[: example.target]
        return float(np.mean([len(b.items) for b in baskets])) if baskets else 0.0

    def _topic_targets(self, examples: Sequence[Example]) -> torch.Tensor | None:
        """(B, num_topics) label distribution of each target basket (all of its items), if topics are on."""
        if self.topics is None:
            return None
        out = np.zeros((len(examples), self.config.num_topics), dtype=np.float32)
        for row, ex in enumerate(examples):
            items = self.dataset.users[ex.user].baskets[ex.target].items
            counts = np.bincount(self.topics[items], minlength=self.config.num_topics)[: self.config.num_topics]
            out[row] = counts / max(counts.sum(), 1)
        return torch.from_numpy(out)

    def training_batch(
        self,
        examples: Sequence[Example],
        *,
        rng: np.random.Generator,
        negatives: str = "sampled",
        random_negatives: int = 100,
        in_batch_negatives: int = 0,
        max_positives: int = 50,
    ) -> tuple[HistoryBatch, CandidateBatch]:
        """Per user: the target's items (positives), the history items, random and in-batch negatives.

        negatives="catalogue" scores every item instead (a full softmax): exact, and cheap for
        catalogues of a few thousand items, but the item tower then runs on inputs shared by all
        users, which per-sample gradient hooks (Opacus) cannot split. In-batch negatives mix other
        users' targets into a user's loss, so both must stay off under user-level DP.
        """
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"unknown negatives mode {negatives!r}; valid: {', '.join(NEGATIVE_MODES)}")
        if negatives == "catalogue":
            history, candidates = self.ranking_batch(examples)
            labels = torch.zeros(candidates.mask.shape)
            for row, ex in enumerate(examples):
                labels[row, torch.as_tensor(self.dataset.users[ex.user].baskets[ex.target].items.tolist())] = 1.0
            candidates.labels = labels
            candidates.topic_targets = self._topic_targets(examples)
            return history, candidates
        history, all_stats = self.history_batch(examples)
        positives = []
        for ex in examples:
            items = self.dataset.users[ex.user].baskets[ex.target].items
            positives.append(rng.permutation(items)[:max_positives] if items.size > max_positives else items)
        shared = np.empty(0, dtype=np.int64)
        if in_batch_negatives:
            pool = np.unique(np.concatenate(positives))
            shared = rng.permutation(pool)[:in_batch_negatives]
        lists = []
        for row, pos in enumerate(positives):
            hist = history.item_ids[row].numpy()
            negatives = rng.integers(0, self.dataset.num_items, size=random_negatives)
            lists.append(np.array(list(dict.fromkeys(np.concatenate([pos, hist[hist >= 0], negatives, shared]).tolist())), dtype=np.int64))
        width = max(len(c) for c in lists)
        b = len(examples)
        ids = np.zeros((b, width), dtype=np.int64)
        mask = np.zeros((b, width), dtype=bool)
        labels = np.zeros((b, width), dtype=np.float32)
        features = np.zeros((b, width, self.num_features), dtype=np.float32)
        sims = self._similarities(all_stats)
        for row, (ex, cand, pos) in enumerate(zip(examples, lists, positives)):
            ids[row, : cand.size] = cand
            mask[row, : cand.size] = True
            labels[row, : pos.size] = 1.0  # positives lead each list
            features[row, : cand.size] = self._features(all_stats[row], ex, cand, None if sims is None else sims[row])
        ids_t = torch.from_numpy(ids)
        return history, CandidateBatch(
            sentence=self.encodings.sentence[ids_t].float(),
            features=torch.from_numpy(features),
            mask=torch.from_numpy(mask),
            labels=torch.from_numpy(labels),
            topic_targets=self._topic_targets(examples),
        )

    def ranking_batch(self, examples: Sequence[Example]) -> tuple[HistoryBatch, CandidateBatch]:
        """Every catalogue item as a candidate for every user (full-catalogue ranking)."""
        history, all_stats = self.history_batch(examples)
        n = self.dataset.num_items
        everything = np.arange(n, dtype=np.int64)
        sims = self._similarities(all_stats)
        features = np.stack([self._features(s, ex, everything, None if sims is None else sims[row])
                             for row, (s, ex) in enumerate(zip(all_stats, examples))])
        return history, CandidateBatch(
            sentence=self.encodings.sentence.float(),
            features=torch.from_numpy(features),
            mask=torch.ones(len(examples), n, dtype=torch.bool),
        )


class Popularity(Protocol):
    """Where the two popularity features of a prediction at a given time come from."""

    num_items: int

    def at(self, timestamp: float) -> tuple[np.ndarray, np.ndarray]:
        """(overall, recent) per item, each normalised to [0, 1]."""
        ...


class PlainPopularity:
    """The plain features: log1p(training baskets with the item), and log1p(baskets with it in the
    RECENT_DAYS before the prediction), each normalised. They count every user: not under DP."""

    def __init__(self, dataset: Dataset, counts: np.ndarray | None = None) -> None:
        counts = train_popularity(dataset) if counts is None else np.asarray(counts, dtype=np.float64)
        if counts.shape != (dataset.num_items,):
            raise ValueError(f"popularity has shape {counts.shape}, the dataset has {dataset.num_items} items")
        self.num_items = dataset.num_items
        self.counts = counts
        self.overall = (np.log1p(counts) / max(np.log1p(counts.max(initial=0.0)), 1e-9)).astype(np.float32)
        self.recent = RecentPopularity(dataset, window_days=RECENT_DAYS)

    def at(self, timestamp: float) -> tuple[np.ndarray, np.ndarray]:
        return self.overall, self.recent.at(timestamp)


class RecentPopularity:
    """Per item, normalised log1p of the baskets containing it in a window before a given time.

    Counts every basket strictly before the window's end (whoever bought it): what a site knows at
    prediction time. Time is binned by day (wider bins for long spans, at most MAX_TIME_BINS).
    """

    def __init__(self, dataset: Dataset, *, window_days: float) -> None:
        times = np.array([b.timestamp for u in dataset.users for b in u.baskets], dtype=np.float64)
        self.start = float(times.min()) if times.size else 0.0
        span_days = (float(times.max()) - self.start) / 86400.0 + 1 if times.size else 1.0
        self.bin_days = max(1.0, span_days / MAX_TIME_BINS)
        num_bins = int(span_days / self.bin_days) + 2
        self.window = max(1, round(window_days / self.bin_days))
        counts = np.zeros((num_bins, dataset.num_items), dtype=np.float32)
        for u in dataset.users:
            for b in u.baskets:
                counts[self._bin(b.timestamp), b.items] += 1
        # cumulative[i] = baskets in bins < i
        self.cumulative = np.concatenate([np.zeros((1, dataset.num_items), np.float32), counts.cumsum(0)])
        self.norm = max(float(np.log1p(counts.max())) if counts.size else 1.0, 1e-9)

    def _bin(self, timestamp: float) -> int:
        return int((timestamp - self.start) / 86400.0 / self.bin_days)

    def at(self, timestamp: float) -> np.ndarray:
        end = min(max(self._bin(timestamp), 0), self.cumulative.shape[0] - 1)
        begin = max(end - self.window, 0)
        return np.log1p(self.cumulative[end] - self.cumulative[begin]) / self.norm


def num_features(config: HierModelConfig) -> int:
    """Features per (user, candidate): NUM_FEATURES, or one fewer without the text similarity."""
    return NUM_FEATURES if config.text_similarity else NUM_FEATURES - 1


def feature_config(config: HierModelConfig) -> HierModelConfig:
    """The config with this module's feature sizes filled in."""
    config.num_repeat_features = NUM_REPEAT_FEATURES
    config.num_features = num_features(config)
    config.stats_dim = NUM_REPEAT_FEATURES
    return config
