"""Splitting a data set into simulated sites, prepared once per run; each site reads only its own."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hiermodel.data.dataset import Dataset
from hiermodel.data.store import MANIFEST, save_dataset
from hiermodel.errors import ConfigError

PARTITION_SCHEMES = ("natural", "dirichlet", "iid")
OTHER_SITES = "other-sites"


@dataclass(frozen=True)
class Partition:
    name: str
    users: list[int]  # indices into dataset.users


def make_partitions(
    dataset: Dataset,
    *,
    scheme: str,
    num_clients: int | None,
    min_site_users: int = 0,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[Partition]:
    """natural: one partition per site (small sites grouped); iid / dirichlet: users over N clients.

    dirichlet draws each client's share of every site's users from Dirichlet(alpha) (flwr-datasets'
    DirichletPartitioner with the site as the label): small alpha = very different clients.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(f"unknown partitioning {scheme!r}; valid: {', '.join(PARTITION_SCHEMES)}")
    if num_clients is not None and num_clients < 1:
        raise ConfigError(f"--num-clients must be at least 1, got {num_clients}")
    if scheme == "natural":
        parts = _natural(dataset, num_clients=num_clients, min_site_users=min_site_users)
    else:
        if num_clients is None:
            raise ConfigError(f"--partition {scheme} needs --num-clients")
        if num_clients > len(dataset.users):
            raise ConfigError(f"--num-clients {num_clients} exceeds the {len(dataset.users)} users of the data set")
        parts = _iid(dataset, num_clients, seed) if scheme == "iid" else _dirichlet(dataset, num_clients, alpha, seed)
    for p in parts:
        if not p.users:
            raise ConfigError(f"partition {p.name!r} is empty; use fewer clients or another partitioning")
    return parts


def _natural(dataset: Dataset, *, num_clients: int | None, min_site_users: int) -> list[Partition]:
    by_site: dict[str, list[int]] = {}
    for i, user in enumerate(dataset.users):
        by_site.setdefault(user.site, []).append(i)
    order = dataset.sites()  # largest first
    kept = [s for s in order if len(by_site[s]) >= min_site_users]
    grouped = [i for s in order if s not in kept for i in by_site[s]]
    parts = [Partition(s, by_site[s]) for s in kept]
    if grouped:
        parts.append(Partition(OTHER_SITES, sorted(grouped)))
    if num_clients is None:
        return parts
    if num_clients > len(parts):
        raise ConfigError(
            f"--num-clients {num_clients} is more than the {len(parts)} sites of natural partitioning"
            f"{f' (sites with fewer than {min_site_users} users grouped)' if min_site_users else ''}; "
            "use at most that many, or --partition iid|dirichlet"
        )
    if num_clients < len(parts):  # the smallest sites share the last client
        rest = sorted(i for p in parts[num_clients - 1 :] for i in p.users)
        parts = parts[: num_clients - 1] + [Partition(OTHER_SITES, rest)]
    return parts


def _iid(dataset: Dataset, num_clients: int, seed: int) -> list[Partition]:
    order = np.random.default_rng(seed).permutation(len(dataset.users))
    return [Partition(f"client-{k}", sorted(chunk.tolist())) for k, chunk in enumerate(np.array_split(order, num_clients))]


def _dirichlet(dataset: Dataset, num_clients: int, alpha: float, seed: int) -> list[Partition]:
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    table = datasets.Dataset.from_dict({"user": list(range(len(dataset.users))), "site": [u.site for u in dataset.users]})
    partitioner = DirichletPartitioner(
        num_partitions=num_clients, partition_by="site", alpha=alpha, min_partition_size=1, seed=seed
    )
    partitioner.dataset = table
    try:
        return [Partition(f"client-{k}", sorted(partitioner.load_partition(k)["user"])) for k in range(num_clients)]
    except ValueError as exc:  # flwr-datasets gives up when it cannot meet the minimum partition size
        raise ConfigError(f"dirichlet partitioning failed ({exc}); use fewer clients or a larger alpha") from None


def write_partitions(dataset: Dataset, partitions: list[Partition], folder: Path) -> list[Path]:
    """Each partition as its own saved data set under folder/<k>/, plus a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(partitions):
        paths.append(save_dataset(dataset.subset(part.users, name=f"{dataset.name}:{part.name}"), folder / str(k)))
    manifest = [{"partition": k, "site": p.name, "users": len(p.users), "path": str(path)}
                for k, (p, path) in enumerate(zip(partitions, paths))]
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return paths
