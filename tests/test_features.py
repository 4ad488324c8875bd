"""Feature building: only baskets before the target, repeat statistics, candidates and labels."""

from __future__ import annotations

import numpy as np
import pytest

from hiermodel.data.dataset import Basket, Catalogue, Dataset, User
from hiermodel.data.split import Example
from hiermodel.encoding_cache import ItemEncodings
from hiermodel.features import NUM_FEATURES, NUM_REPEAT_FEATURES, FeatureBuilder, feature_config
from hiermodel.model import HierModelConfig

DAY = 86400.0


def _encodings(n: int, dim: int = 4, tokens: int = 3) -> ItemEncodings:
    import torch

    g = torch.Generator().manual_seed(0)
    return ItemEncodings(
        token_states=torch.randn(n, tokens, dim, generator=g).half(),
        token_mask=torch.ones(n, tokens, dtype=torch.bool),
        sentence=torch.randn(n, dim, generator=g).half(),
    )


def _builder(baskets: list[list[int]], n: int = 6, **config) -> FeatureBuilder:
    catalogue = Catalogue([f"i{i}" for i in range(n)], [f"item {i}" for i in range(n)])
    user = User("u", "s", [Basket(t * DAY, np.array(b, dtype=np.int64)) for t, b in enumerate(baskets)])
    other = User("v", "s", [Basket(0.5 * DAY, np.array([5])), Basket(9 * DAY, np.array([5]))])
    dataset = Dataset("t", catalogue, [user, other])
    config = feature_config(HierModelConfig(backbone_dim=4, max_tokens=3, dim=4, max_history_items=4, max_baskets=2, max_basket_items=3,
                                            **config))
    return FeatureBuilder(dataset=dataset, encodings=_encodings(n), config=config)


def test_features_come_only_from_earlier_baskets() -> None:
    builder = _builder([[0, 1], [1, 2], [3], [4]])
    history, candidates = builder.ranking_batch([Example(0, 2)])
    ids = history.item_ids[0].tolist()
    assert sorted(i for i in ids if i >= 0) == [0, 1, 2]  # items 3 and 4 are the target and later
    feats = candidates.features[0].numpy()
    in_history = feats[:, NUM_REPEAT_FEATURES - 1]
    assert in_history.tolist() == [1, 1, 1, 0, 0, 0]
    assert feats[1, 0] == pytest.approx(np.log1p(2))  # item 1 was in two baskets
    assert feats[1, 1] == pytest.approx(1.0)  # ... out of two
    assert feats[0, 3] == pytest.approx(0.5)  # item 0: one basket back -> 1 / (1 + 1)
    assert feats[2, 3] == pytest.approx(1.0)  # item 2: in the last basket
    # recent popularity counts baskets strictly before the target day: the other user's day-0 basket
    assert feats[5, NUM_REPEAT_FEATURES + 1] > 0 and feats[4, NUM_REPEAT_FEATURES + 1] == 0
    assert feats.shape == (6, NUM_FEATURES - 1)  # the text similarity is off by default


def test_history_keeps_the_most_recent_distinct_items_and_baskets() -> None:
    builder = _builder([[0], [1], [2], [3], [4], [5]])
    history, _ = builder.history_batch([Example(0, 5)])
    assert history.item_ids[0].tolist() == [4, 3, 2, 1]  # H = 4, most recent first
    assert history.basket_mask[0].tolist() == [True, True]  # K = 2 most recent baskets
    assert history.basket_slot[0].tolist() == [1, 0]
    # basket members point at positions in the history items
    assert history.item_ids[0][history.basket_items[0, 1, 0]].item() == 4


def test_training_candidates_lead_with_positives_and_are_unique() -> None:
    builder = _builder([[0, 1], [1, 2], [3, 4]])
    _, c = builder.training_batch([Example(0, 2)], rng=np.random.default_rng(0), random_negatives=20)
    n = int(c.mask[0].sum())
    assert c.labels[0, :2].tolist() == [1.0, 1.0] and c.labels[0].sum() == 2
    sentence = c.sentence[0, :n]
    assert len({tuple(r.tolist()) for r in sentence}) == n  # no item twice
    full_h, full = builder.training_batch([Example(0, 2)], rng=np.random.default_rng(0), negatives="catalogue")
    assert full.mask.shape == (1, 6) and full.labels[0].tolist() == [0, 0, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="negatives"):
        builder.training_batch([Example(0, 2)], rng=np.random.default_rng(0), negatives="nope")


def test_text_similarity_is_the_zero_shot_baseline_and_only_there_when_asked() -> None:
    from hiermodel.baselines import ZeroShotLM

    builder = _builder([[0, 1], [1, 2], [3], [4]], text_similarity=True)
    examples = [Example(0, 2), Example(0, 3), Example(1, 1)]
    _, candidates = builder.ranking_batch(examples)
    assert builder.config.num_features == NUM_FEATURES and candidates.features.shape[-1] == NUM_FEATURES
    expected = ZeroShotLM(builder.encodings.sentence.float().numpy()).score(builder.dataset, examples)
    np.testing.assert_allclose(candidates.features[..., -1].numpy(), expected, atol=1e-5)
    # sampled candidates read the same values for their items
    _, sampled = builder.training_batch(examples[:1], rng=np.random.default_rng(0), random_negatives=3)
    ids = [int(np.flatnonzero((builder.encodings.sentence.float() == row).all(1))[0]) for row in sampled.sentence[0]]
    mask = sampled.mask[0].numpy()
    np.testing.assert_allclose(sampled.features[0, mask, -1].numpy(), expected[0, np.array(ids)[mask]], atol=1e-5)

    off = feature_config(HierModelConfig(**{**builder.config.__dict__, "text_similarity": False}))
    plain = FeatureBuilder(dataset=builder.dataset, encodings=builder.encodings, config=off)
    _, without = plain.ranking_batch(examples)
    assert off.num_features == NUM_FEATURES - 1 and without.features.shape[-1] == NUM_FEATURES - 1
    np.testing.assert_array_equal(without.features.numpy(), candidates.features[..., :-1].numpy())



@pytest.mark.parametrize("gather_rows", [8192, 5, 1])
def test_history_vectors_in_chunks_are_each_historys_count_weighted_mean(monkeypatch, gather_rows: int) -> None:
    from types import SimpleNamespace

    import hiermodel.text_similarity as text_similarity

    rng = np.random.default_rng(0)
    unit = text_similarity.unit_rows(rng.normal(size=(40, 6)))
    histories = [SimpleNamespace(items=np.sort(rng.choice(40, size=k, replace=False)),
                                 count=rng.integers(1, 4, size=k).astype(float)) for k in (3, 0, 7, 1, 0, 12)]
    monkeypatch.setattr(text_similarity, "GATHER_ROWS", gather_rows)
    got = text_similarity.history_vectors(histories, unit)
    for row, h in enumerate(histories):
        want = h.count @ unit[h.items] if h.items.size else np.zeros(6)
        norm = np.linalg.norm(want)
        assert np.allclose(got[row], want / norm if norm else want)
