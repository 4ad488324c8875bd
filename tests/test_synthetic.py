"""The synthetic generator: deterministic, hierarchical in its texts, site-specific, and learnable."""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest

from hiermodel.data import Dataset, SyntheticConfig, generate_synthetic, load_dataset, split_examples, train_popularity
from hiermodel.errors import ConfigError


@pytest.fixture(scope="module")
def data() -> Dataset:
    return generate_synthetic()


def fingerprint(dataset: Dataset) -> list:
    return [
        (u.user_id, u.site, [(b.timestamp, b.items.tolist()) for b in u.baskets]) for u in dataset.users
    ] + [dataset.catalogue.texts]


def noun(title: str) -> str:
    return title.split()[-1]


def test_defaults_and_ids(data: Dataset) -> None:
    config = SyntheticConfig()
    assert data.name == "synthetic"
    assert data.num_items == config.num_items == 6 * 4 * 15
    assert len(data.users) == 600
    assert data.catalogue.item_ids[0] == "S0001" and data.users[0].user_id == "u0001"
    assert sorted(data.sites()) == [f"site-{s}" for s in range(4)]
    assert all(len(b.items) == len(set(b.items.tolist())) > 0 for u in data.users for b in u.baskets)
    for u in data.users:
        gaps = np.diff([b.timestamp for b in u.baskets])
        assert (gaps >= 86_400).all()  # days apart
    assert sum(len(u.baskets) >= 3 for u in data.users) > 500


def test_deterministic_per_seed(data: Dataset) -> None:
    assert fingerprint(generate_synthetic(SyntheticConfig(seed=0))) == fingerprint(data)
    assert fingerprint(load_dataset("synthetic")) == fingerprint(data)
    assert fingerprint(generate_synthetic(SyntheticConfig(seed=1))) != fingerprint(data)


def test_titles_reveal_the_hierarchy(data: Dataset) -> None:
    labels = data.catalogue.labels
    by_subtopic: dict[str, set[str]] = defaultdict(set)
    by_topic: dict[str, set[str]] = defaultdict(set)
    for title, topic, subtopic in zip(data.catalogue.texts, labels["topic"], labels["subtopic"]):
        words = title.split()
        assert len(words) == 5 and title == title.upper()
        by_subtopic[subtopic].add(words[-1])
        by_topic[topic].add(words[-2])
    assert all(len(nouns) == 1 for nouns in by_subtopic.values())  # one shared noun per subtopic
    assert all(len(words) == 1 for words in by_topic.values())  # one shared topic word per topic
    assert len({n for nouns in by_subtopic.values() for n in nouns}) == 24
    assert len(set(data.catalogue.texts)) == data.num_items


def test_large_vocabularies_stay_distinct() -> None:
    big = generate_synthetic(SyntheticConfig(num_users=20, num_topics=14, subtopics_per_topic=7, items_per_subtopic=2))
    assert len({noun(t) for t in big.catalogue.texts}) == 14 * 7
    assert len({t.split()[-2] for t in big.catalogue.texts}) == 14


def test_sites_have_different_topic_mixes(data: Dataset) -> None:
    topics = sorted(set(data.catalogue.labels["topic"]))
    topic_of = np.array([topics.index(t) for t in data.catalogue.labels["topic"]])
    mixes = {}
    for site in data.sites():
        counts = np.zeros(len(topics))
        for u in data.users:
            if u.site == site:
                for b in u.baskets:
                    np.add.at(counts, topic_of[b.items], 1)
        mixes[site] = counts / counts.sum()
    distances = [0.5 * np.abs(mixes[a] - mixes[b]).sum() for a, b in itertools.combinations(mixes, 2)]
    assert np.mean(distances) > 0.2


def test_repeats_and_skewed_popularity(data: Dataset) -> None:
    repeats = slots = 0
    for u in data.users:
        seen: set[int] = set()
        for b in u.baskets:
            if seen:
                repeats += sum(int(i) in seen for i in b.items)
                slots += len(b.items)
            seen.update(b.items.tolist())
    assert 0.35 < repeats / slots < 0.85
    counts = np.sort(train_popularity(data))[::-1]
    assert counts[: data.num_items // 10].sum() > 0.3 * counts.sum()  # top 10% of items: > 30% of purchases


def test_history_text_beats_popularity_on_new_items(data: Dataset) -> None:
    nouns, noun_of = np.unique([noun(t) for t in data.catalogue.texts], return_inverse=True)
    popularity = train_popularity(data)
    shared = expected = 0.0
    hits = {"popularity": 0, "history text": 0}
    evaluated = 0
    for ex in split_examples(data, "test"):
        baskets = data.users[ex.user].baskets
        bought = np.concatenate([b.items for b in baskets[: ex.target]])
        new = np.setdiff1d(baskets[ex.target].items, bought)
        if not len(new):
            continue
        evaluated += 1
        candidate = np.ones(data.num_items, dtype=bool)
        candidate[bought] = False  # rank new items only
        # Per item, how many history purchases share its title's subtopic noun.
        same_noun = np.bincount(noun_of[bought], minlength=len(nouns))[noun_of]
        shared += (same_noun[new] > 0).mean()
        pop = popularity * candidate
        expected += pop[same_noun > 0].sum() / pop.sum()  # what a popularity draw would give
        scores = {"popularity": pop, "history text": (pop + 1.0) * same_noun * candidate}
        for name, score in scores.items():
            hits[name] += bool(np.isin(new, np.argsort(-score, kind="stable")[:10]).any())
    shared, expected = shared / evaluated, expected / evaluated
    assert shared > 0.7 and shared > expected + 0.3
    assert hits["history text"] > 2.0 * hits["popularity"]


def test_invalid_config() -> None:
    with pytest.raises(ConfigError, match="num_users"):
        SyntheticConfig(num_users=0)
    with pytest.raises(ConfigError, match="repeat_prob"):
        SyntheticConfig(repeat_prob=1.5)
