"""Hand-computed cases for every metric and the top-k tie rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hiermodel.metrics import (
    auc,
    mind_mrr,
    mind_ndcg_at_k,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank,
    top_k_indices,
)

LOG2_3 = math.log2(3)
LOG2_5 = math.log2(5)


# --- top_k_indices ---------------------------------------------------------------------------


def test_top_k_orders_by_score_then_lower_index():
    scores = np.array([[3.0, 1.0, 3.0, 2.0, 3.0]])
    assert top_k_indices(scores, 2).tolist() == [[0, 2]]
    assert top_k_indices(scores, 4).tolist() == [[0, 2, 4, 3]]


def test_top_k_cut_inside_a_tie_keeps_the_lowest_indices():
    scores = np.array([[1.0, 5.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_k_indices(scores, 3).tolist() == [[1, 0, 2], [0, 1, 2]]


def test_top_k_handles_minus_inf_and_clips_k():
    scores = np.array([[-np.inf, 2.0, -np.inf]])
    assert top_k_indices(scores, 10).tolist() == [[1, 0, 2]]
    assert top_k_indices(scores, 0).shape == (1, 0)


def test_top_k_matches_a_stable_full_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 40)).astype(float)  # many ties
    expected = np.argsort(-scores, axis=1, kind="stable")
    for k in (1, 7, 40):
        assert np.array_equal(top_k_indices(scores, k), expected[:, :k])


def test_top_k_rejects_one_dimensional_scores():
    with pytest.raises(ValueError, match="must be"):
        top_k_indices(np.array([1.0, 2.0]), 1)


# --- recall_at_k / ndcg_at_k ----------------------------------------------------------------


RANKED = np.array([5, 3, 1, 2])


def test_recall_at_k():
    assert recall_at_k(RANKED, {3, 2, 9}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, [3, 2, 9], 4) == pytest.approx(2 / 3)
    assert recall_at_k(RANKED, np.array([3, 3, 2]), 4) == pytest.approx(1.0)  # duplicates count once
    assert recall_at_k(RANKED, {7}, 4) == 0.0


def test_recall_of_empty_relevance_is_zero():
    assert recall_at_k(RANKED, set(), 2) == 0.0
    assert recall_at_k(RANKED, np.array([], dtype=np.int64), 2) == 0.0


def test_ndcg_at_k():
    assert ndcg_at_k(RANKED, {3, 2}, 2) == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3))
    assert ndcg_at_k(RANKED, {3, 2}, 4) == pytest.approx((1 / LOG2_3 + 1 / LOG2_5) / (1 + 1 / LOG2_3))
    assert ndcg_at_k(RANKED, {5}, 3) == pytest.approx(1.0)


def test_ndcg_ideal_dcg_uses_at_most_k_hits():
    assert ndcg_at_k(RANKED, {5, 3, 1}, 2) == pytest.approx(1.0)


def test_ndcg_of_empty_relevance_is_zero():
    assert ndcg_at_k(RANKED, set(), 3) == 0.0


# --- reciprocal_rank ------------------------------------------------------------------------


def test_reciprocal_rank():
    assert reciprocal_rank(np.array([0.1, 0.5, 0.3]), {2}) == pytest.approx(1 / 2)
    assert reciprocal_rank(np.array([0.1, 0.5, 0.3]), {0, 2}) == pytest.approx(1 / 2)
    assert reciprocal_rank(np.array([0.1, 0.5, 0.3]), {1}) == 1.0


def test_reciprocal_rank_follows_the_tie_rule():
    assert reciprocal_rank(np.array([1.0, 1.0, 1.0]), {2}) == pytest.approx(1 / 3)
    assert reciprocal_rank(np.array([1.0, 1.0, 1.0]), {1, 2}) == pytest.approx(1 / 2)
    assert reciprocal_rank(np.array([0.2, 0.9, 0.9, 0.1]), {2}) == pytest.approx(1 / 2)


def test_reciprocal_rank_agrees_with_the_full_ranking():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 3, size=(20, 15)).astype(float)
    ranking = top_k_indices(scores, 15)
    for row in range(20):
        relevant = set(rng.choice(15, size=3, replace=False).tolist())
        first = next(pos for pos, item in enumerate(ranking[row]) if item in relevant)
        assert reciprocal_rank(scores[row], relevant) == pytest.approx(1 / (first + 1))


def test_reciprocal_rank_of_empty_relevance_is_zero():
    assert reciprocal_rank(np.array([0.1, 0.2]), set()) == 0.0


# --- MIND impression metrics ----------------------------------------------------------------


def test_auc():
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.3, 0.1])) == pytest.approx(3 / 4)
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # a tie counts half
    assert auc(np.array([0, 1, 1]), np.array([0.2, 0.2, 0.7])) == pytest.approx(0.75)


def test_auc_matches_sklearn():
    rng = np.random.default_rng(2)
    for _ in range(20):
        labels = rng.integers(0, 2, size=12)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 5, size=12).astype(float)
        assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_auc_of_one_class_is_nan():
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    assert math.isnan(auc(np.array([0, 0]), np.array([0.1, 0.2])))


def test_mind_mrr():
    labels, scores = np.array([0, 1, 0, 1]), np.array([0.4, 0.3, 0.2, 0.1])
    assert mind_mrr(labels, scores) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert mind_mrr(np.array([1, 0]), np.array([0.5, 0.5])) == 1.0  # tie: lower position first
    assert mind_mrr(np.array([0, 0]), np.array([0.5, 0.1])) == 0.0


def test_mind_ndcg_at_k():
    labels, scores = np.array([0, 1, 0, 1]), np.array([0.4, 0.3, 0.2, 0.1])
    assert mind_ndcg_at_k(labels, scores, 5) == pytest.approx((1 / LOG2_3 + 1 / LOG2_5) / (1 + 1 / LOG2_3))
    assert mind_ndcg_at_k(labels, scores, 1) == 0.0
    assert mind_ndcg_at_k(np.array([1, 0, 0]), np.array([0.1, 0.9, 0.5]), 5) == pytest.approx(1 / 2)


def _mind_script_mrr(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """The MIND evaluation script's mrr_score, verbatim in substance."""
    order = np.argsort(y_score)[::-1]
    y_true = np.take(y_true, order)
    return float(np.sum(y_true / (np.arange(len(y_true)) + 1)) / np.sum(y_true))


def _mind_script_ndcg(y_true: np.ndarray, y_score: np.ndarray, k: int) -> float:
    """The MIND evaluation script's ndcg_score, verbatim in substance."""

    def dcg(y: np.ndarray, s: np.ndarray) -> float:
        order = np.argsort(s)[::-1]
        y = np.take(y, order[:k])
        return float(np.sum((2**y - 1) / np.log2(np.arange(len(y)) + 2)))

    return dcg(y_true, y_score) / dcg(y_true, y_true)


def test_impression_metrics_match_the_mind_script_without_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, size=9)
        labels[0] = 1
        scores = rng.permutation(9).astype(float)
        assert mind_mrr(labels, scores) == pytest.approx(_mind_script_mrr(labels, scores))
        for k in (5, 10):
            assert mind_ndcg_at_k(labels, scores, k) == pytest.approx(_mind_script_ndcg(labels, scores, k))
