"""Baselines, history statistics and evaluate_ranker on tiny hand-made data sets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from hiermodel.baselines import (
    BASELINE_NAMES,
    DecayedRepeat,
    GlobalPopularity,
    ItemKNN,
    PersonalPopularity,
    ZeroShotLM,
    build_baseline,
    training_basket_matrix,
)
from hiermodel.data.dataset import Basket, Catalogue, Dataset, User
from hiermodel.data.split import Example, split_examples, train_popularity
from hiermodel.evaluation import Ranker, evaluate_ranker
from hiermodel.history import history_matrix, user_history
from hiermodel.metrics import top_k_indices

DAY = 86_400.0


def make_dataset(users: Sequence[Sequence[Sequence[int]]], *, num_items: int = 6) -> Dataset:
    """One user per list of baskets; basket b of every user is on day b."""
    catalogue = Catalogue(item_ids=[f"i{i}" for i in range(num_items)], texts=[f"item {i}" for i in range(num_items)])
    return Dataset(
        name="tiny",
        catalogue=catalogue,
        users=[
            User(
                user_id=f"u{u}",
                site="s",
                baskets=[
                    Basket(timestamp=b * DAY, items=np.asarray(items, dtype=np.int64)) for b, items in enumerate(baskets)
                ],
            )
            for u, baskets in enumerate(users)
        ],
    )


def ranking(ranker: Ranker, dataset: Dataset, example: Example) -> list[int]:
    """The full ranking a ranker gives one example."""
    scores = ranker.score(dataset, [example])
    return top_k_indices(scores, dataset.num_items)[0].tolist()


class FixedScores:
    """A ranker giving every example the same scores."""

    name = "fixed"

    def __init__(self, scores: Sequence[float]) -> None:
        self.scores = np.asarray(scores, dtype=np.float64)

    def score(self, dataset: Dataset, examples: Sequence[Example]) -> np.ndarray:
        return np.tile(self.scores, (len(examples), 1))


# User 0 is evaluated (4 baskets: test = [4], validation = [3]); user 1 (2 baskets) only trains.
# Training popularity: 0:1, 1:2, 2:1, 3:0 (only in a validation basket), 4:1, 5:2.
REPEAT = make_dataset([[[0, 1], [1, 2], [3], [4]], [[5], [5, 4]]])
REPEAT_TEST = Example(user=0, target=3)


# --- history --------------------------------------------------------------------------------


def test_user_history_statistics():
    h = user_history(REPEAT.users[0], 3)
    assert h.items.tolist() == [0, 1, 2, 3]
    assert h.count.tolist() == [1, 2, 1, 1]
    assert h.decayed_count == pytest.approx([0.81, 0.81 + 0.9, 0.9, 1.0])
    assert h.baskets_since_last.tolist() == [2, 1, 1, 0]
    assert h.days_since_last == pytest.approx([3.0, 2.0, 2.0, 1.0])
    assert h.in_last_basket.tolist() == [False, False, False, True]
    assert h.num_baskets == 3
    assert h.days_since_last_basket == pytest.approx(1.0)
    assert h.dense("count", 6).tolist() == [1, 2, 1, 1, 0, 0]


def test_user_history_uses_only_earlier_baskets_and_custom_decay():
    h = user_history(REPEAT.users[0], 2, decay=0.5)
    assert h.items.tolist() == [0, 1, 2]
    assert h.decayed_count == pytest.approx([0.5, 1.5, 1.0])


def test_user_history_empty_and_next_basket():
    empty = user_history(REPEAT.users[0], 0)
    assert empty.items.size == 0 and empty.num_baskets == 0 and math.isnan(empty.days_since_last_basket)
    following = user_history(REPEAT.users[0], 4, now=10 * DAY)
    assert following.items.tolist() == [0, 1, 2, 3, 4]
    assert following.days_since_last_basket == pytest.approx(7.0)
    with pytest.raises(ValueError, match="out of range"):
        user_history(REPEAT.users[0], 4)


def test_history_matrix():
    histories = [user_history(REPEAT.users[0], 3), user_history(REPEAT.users[1], 1)]
    matrix = history_matrix(histories, "count", 6).toarray()
    assert matrix.tolist() == [[1, 2, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]]


# --- popularity and repeat baselines --------------------------------------------------------


def test_gpop_ranks_by_training_popularity_lower_index_on_ties():
    assert train_popularity(REPEAT).tolist() == [1, 2, 1, 0, 1, 2]
    assert ranking(GlobalPopularity(dataset=REPEAT), REPEAT, REPEAT_TEST) == [1, 5, 0, 2, 4, 3]


def test_ppop_orders_by_count_then_recency_then_gpop_fill():
    # 1 (2 baskets); then count 1 by recency: 3 (last basket), 2, 0; then unbought by popularity: 5, 4.
    assert ranking(PersonalPopularity(dataset=REPEAT), REPEAT, REPEAT_TEST) == [1, 3, 2, 0, 5, 4]


def test_ppop_full_ties_go_to_the_lower_index():
    data = make_dataset([[[2, 0], [1], [5]]])
    assert ranking(PersonalPopularity(dataset=data), data, Example(0, 2))[:3] == [1, 0, 2]


def test_decayed_repeat_prefers_recent_over_frequent():
    data = make_dataset([[[0], [0], [1], [4]], [[5], [5]]])
    example = Example(0, 3)
    assert ranking(PersonalPopularity(dataset=data), data, example)[:3] == [0, 1, 5]
    assert ranking(DecayedRepeat(dataset=data, decay=0.5), data, example)[:3] == [1, 0, 5]  # 1.0 > 0.5 + 0.25
    assert ranking(DecayedRepeat(dataset=data), data, example)[:3] == [0, 1, 5]  # 0.9 + 0.81 > 1.0


# --- item KNN -------------------------------------------------------------------------------

# Training baskets: [0, 4] (user 0's first), [0, 1], [0, 1, 2], [2, 3]; user 0's [0] and [3, 5] are
# validation and test. Cosine: s01 = 2/sqrt(6), s02 = 1/sqrt(6), s04 = 1/sqrt(3), s12 = 1/2, s23 = 1/sqrt(2).
KNN = make_dataset([[[0, 4], [0], [3, 5]], [[0, 1], [0, 1, 2]], [[2, 3]]])


def test_itemknn_training_baskets_are_those_train_popularity_counts():
    assert np.array_equal(np.asarray(training_basket_matrix(KNN).sum(axis=0)).ravel(), train_popularity(KNN))
    assert np.array_equal(np.asarray(training_basket_matrix(REPEAT).sum(axis=0)).ravel(), train_popularity(REPEAT))


def test_itemknn_similarity_and_scores_by_hand():
    knn = ItemKNN(dataset=KNN)
    sim = knn.similarity.toarray()
    assert sim[0, 1] == pytest.approx(2 / math.sqrt(6)) and sim[1, 2] == pytest.approx(0.5)
    assert sim[2, 3] == pytest.approx(1 / math.sqrt(2)) and np.all(np.diag(sim) == 0)
    # History counts 0:2, 4:1, so score_i = 2 s0i + s4i.
    scores = knn.score(KNN, [Example(0, 2)])[0]
    assert scores == pytest.approx([1 / math.sqrt(3), 4 / math.sqrt(6), 2 / math.sqrt(6), 0.0, 2 / math.sqrt(3), 0.0])


# --- zero-shot ------------------------------------------------------------------------------


def test_zeroshot_cosine_to_the_weighted_mean_and_popularity_prior():
    data = make_dataset([[[0], [0, 1], [3]]], num_items=4)
    vectors = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    user = np.array([2.0, 1.0]) / math.sqrt(5)  # counts 0:2, 1:1 over unit vectors
    expected = np.array([user @ [1, 0], user @ [0, 1], user @ np.array([1, 1]) / math.sqrt(2), user @ [-1, 0]])
    assert ZeroShotLM(vectors).score(data, [Example(0, 2)])[0] == pytest.approx(expected)
    popularity = np.array([3.0, 0.0, 1.0, 0.0])
    with_prior = ZeroShotLM(vectors, popularity=popularity, popularity_weight=0.5).score(data, [Example(0, 2)])[0]
    assert with_prior == pytest.approx(expected + 0.5 * np.log1p(popularity))


# --- no ranker looks at the target basket or later ------------------------------------------

BASE_USERS = [[[0, 1], [1, 2], [3], [4]], [[0], [2, 5], [1]], [[5], [5, 4]], [[3, 4], [0], [2]]]


def _rewrite_from(users: list, targets: dict[int, int], items: list[int]) -> Dataset:
    """The same users with every basket from each user's target on replaced by ``items``."""
    changed = [[b if i < targets.get(u, len(bs)) else items for i, b in enumerate(bs)] for u, bs in enumerate(users)]
    return make_dataset(changed)


@pytest.mark.parametrize("split", ["test", "validation"])
@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_no_ranker_looks_at_the_target_or_later(name, split):
    base = make_dataset(BASE_USERS)
    examples = split_examples(base, split)
    targets = {ex.user: ex.target for ex in examples}
    vectors = np.random.default_rng(0).normal(size=(6, 4))
    scores = []
    for items in ([0, 1, 2, 3, 4, 5], [3], [5, 4]):  # leaking any of these would move scores
        data = _rewrite_from(BASE_USERS, targets, items)
        scores.append(build_baseline(name, dataset=data, item_vectors=vectors).score(data, examples))
    assert np.allclose(scores[0], scores[1]) and np.allclose(scores[0], scores[2])


# --- evaluate_ranker ------------------------------------------------------------------------


def test_evaluate_ranker_metric_names_and_counts():
    result = evaluate_ranker(GlobalPopularity(dataset=REPEAT), REPEAT)
    for name in ("recall@10", "recall@20", "ndcg@10", "mrr", "explore_recall@20", "users", "explore_users"):
        assert name in result
    assert result["users"] == 1 and result["explore_users"] == 1
    assert "impression_auc" not in result


def test_explore_recall_ranks_and_counts_only_items_outside_the_history():
    # History {0, 1}; test basket {1, 4}: the one new item is 4.
    data = make_dataset([[[0], [1], [1, 4]]])
    result = evaluate_ranker(FixedScores([10, 9, 8, 7, 6, 5]), data, ks=(2, 3))
    assert result["recall@2"] == pytest.approx(0.5)  # full ranking 0, 1, ...: item 1 found
    assert result["explore_recall@2"] == 0.0  # ranking without history: 2, 3 | 4, 5
    assert result["explore_recall@3"] == 1.0
    assert result["mrr"] == pytest.approx(1 / 2)


def test_users_whose_target_is_all_repeats_have_no_explore_score():
    data = make_dataset([[[0], [1], [0, 1]], [[0], [1], [5]]])
    result = evaluate_ranker(FixedScores([0, 0, 0, 0, 0, 1]), data)
    assert result["users"] == 2 and result["explore_users"] == 1
    assert result["explore_recall@20"] == 1.0


def test_evaluate_ranker_batches_give_the_same_result():
    data = make_dataset(BASE_USERS)
    ranker = PersonalPopularity(dataset=data)
    assert evaluate_ranker(ranker, data, batch_size=1) == pytest.approx(evaluate_ranker(ranker, data))


def test_impression_metrics_over_shown_candidates():
    data = make_dataset([[[0], [1], [2]], [[0], [1], [4]]])
    data.users[0].baskets[2].shown = np.array([5, 2, 3], dtype=np.int64)  # clicked 2
    data.users[1].baskets[2].shown = np.array([4, 0], dtype=np.int64)  # clicked 4
    result = evaluate_ranker(FixedScores([0, 0, 2, 3, 5, 1]), data)
    assert result["impressions"] == 2
    assert result["impression_auc"] == pytest.approx((0.5 + 1.0) / 2)  # 2 beats 5, loses to 3; 4 beats 0
    assert result["impression_mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert result["impression_ndcg@5"] == pytest.approx((1 / math.log2(3) + 1) / 2)


def test_evaluate_ranker_rejects_bad_scores():
    data = make_dataset([[[0], [1], [2]]])
    with pytest.raises(ValueError, match="shape"):
        evaluate_ranker(FixedScores([1.0, 2.0]), data)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranker(FixedScores([np.nan] * 6), data)


# --- registry -------------------------------------------------------------------------------


def test_registry_builds_every_name():
    vectors = np.eye(6)
    for name in BASELINE_NAMES:
        ranker = build_baseline(name, dataset=REPEAT, item_vectors=vectors)
        assert ranker.name == name and isinstance(ranker, Ranker)
    assert set(BASELINE_NAMES) == {"gpop", "ppop", "decayed-repeat", "itemknn", "zeroshot", "zeroshot-pop", "gbdt"}


def test_registry_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(ValueError, match="unknown baseline 'pop'; valid: gpop, ppop, decayed-repeat, itemknn"):
        build_baseline("pop", dataset=REPEAT)


@pytest.mark.parametrize("name", ["zeroshot", "zeroshot-pop"])
def test_zeroshot_needs_item_vectors(name):
    with pytest.raises(ValueError, match="needs item_vectors"):
        build_baseline(name, dataset=REPEAT)


def test_zeroshot_rejects_vectors_of_another_catalogue():
    with pytest.raises(ValueError, match="item vectors for a catalogue"):
        ZeroShotLM(np.eye(3)).score(REPEAT, [REPEAT_TEST])
