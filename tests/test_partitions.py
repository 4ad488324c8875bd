"""Partitioning a data set into simulated sites, and saving/loading partitions unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from hiermodel.data import load_dataset
from hiermodel.data.store import load_dataset_folder, save_dataset
from hiermodel.data.synthetic import SyntheticConfig, generate_synthetic
from hiermodel.errors import ConfigError
from hiermodel.data.store import read_manifest
from simulation.partitions import OTHER_SITES, make_partitions, write_partitions


@pytest.fixture(scope="module")
def dataset():
    return generate_synthetic(SyntheticConfig(num_users=120, num_sites=4))


def test_natural_is_one_partition_per_site(dataset) -> None:
    parts = make_partitions(dataset, scheme="natural", num_clients=None)
    assert [p.name for p in parts] == dataset.sites()
    assert sorted(i for p in parts for i in p.users) == list(range(len(dataset.users)))
    for p in parts:
        assert {dataset.users[i].site for i in p.users} == {p.name}


def test_natural_groups_small_sites_and_refuses_too_many_clients(dataset) -> None:
    sizes = {s: sum(u.site == s for u in dataset.users) for s in dataset.sites()}
    smallest = min(sizes.values())
    parts = make_partitions(dataset, scheme="natural", num_clients=None, min_site_users=smallest + 1)
    assert parts[-1].name == OTHER_SITES and len(parts) < len(sizes) + 1
    two = make_partitions(dataset, scheme="natural", num_clients=2)
    assert len(two) == 2 and two[1].name == OTHER_SITES
    with pytest.raises(ConfigError, match="more than the 4 sites"):
        make_partitions(dataset, scheme="natural", num_clients=5)


def test_iid_and_dirichlet_cover_every_user_once(dataset) -> None:
    for scheme in ("iid", "dirichlet"):
        parts = make_partitions(dataset, scheme=scheme, num_clients=3, alpha=0.3, seed=1)
        users = [i for p in parts for i in p.users]
        assert len(parts) == 3 and sorted(users) == list(range(len(dataset.users)))
    iid = make_partitions(dataset, scheme="iid", num_clients=3)
    assert max(len(p.users) for p in iid) - min(len(p.users) for p in iid) <= 1


def test_bad_partitioning_is_a_clear_error(dataset) -> None:
    with pytest.raises(ConfigError, match="unknown partitioning"):
        make_partitions(dataset, scheme="random", num_clients=2)
    with pytest.raises(ConfigError, match="needs --num-clients"):
        make_partitions(dataset, scheme="iid", num_clients=None)
    with pytest.raises(ConfigError, match="exceeds"):
        make_partitions(dataset, scheme="iid", num_clients=10_000)


def test_partitions_are_saved_and_read_back_unchanged(dataset, tmp_path) -> None:
    parts = make_partitions(dataset, scheme="natural", num_clients=None)
    paths = write_partitions(dataset, parts, tmp_path)
    manifest = read_manifest(tmp_path)
    assert [m["site"] for m in manifest] == [p.name for p in parts]
    site = load_dataset(str(paths[1]))  # a saved partition is an accepted --dataset PATH
    original = dataset.subset(parts[1].users)
    assert [u.user_id for u in site.users] == [u.user_id for u in original.users]
    for u, v in zip(site.users, original.users):
        assert u.site == v.site and len(u.baskets) == len(v.baskets)
        for a, b in zip(u.baskets, v.baskets):
            assert a.timestamp == b.timestamp and np.array_equal(a.items, b.items)
    assert site.catalogue.item_ids == dataset.catalogue.item_ids and site.catalogue.labels == dataset.catalogue.labels


def test_store_keeps_impression_candidates(tmp_path) -> None:
    from hiermodel.data.dataset import Basket, Catalogue, Dataset, User

    ds = Dataset("m", Catalogue(["a", "b", "c"], ["x", "y", "z"]),
                 [User("u", "all", [Basket(1.0, np.array([0]), np.array([0, 1, 2])), Basket(2.0, np.array([2]))])])
    back = load_dataset_folder(save_dataset(ds, tmp_path / "m"))
    assert back.users[0].baskets[0].shown.tolist() == [0, 1, 2] and back.users[0].baskets[1].shown is None
