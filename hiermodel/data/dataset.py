"""The one internal form of behaviour data: sites -> users -> time-ordered baskets -> items -> text."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Catalogue:
    """Items, by internal index: external id, text, and optional label columns (e.g. MIND category)."""

    item_ids: list[str]
    texts: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.texts):
            raise ValueError("catalogue: item_ids and texts differ in length")
        for name, values in self.labels.items():
            if len(values) != len(self.item_ids):
                raise ValueError(f"catalogue: label column {name!r} differs in length from item_ids")

    def __len__(self) -> int:
        return len(self.item_ids)

    def index(self) -> dict[str, int]:
        """External item id -> internal index."""
        return {item_id: i for i, item_id in enumerate(self.item_ids)}


@dataclass
class Basket:
    """One invoice / session / impression: the items chosen, at one time.

    ``shown`` holds an impression's shown candidates (MIND: clicked and not clicked); None elsewhere.
    """

    timestamp: float  # Unix seconds
    items: np.ndarray  # int64 internal item indices, unique, in first-seen order
    shown: np.ndarray | None = None


@dataclass
class User:
    user_id: str
    site: str
    baskets: list[Basket]  # sorted by timestamp


@dataclass
class Dataset:
    """A whole data set in the internal form, plus counts of what loading skipped (shown in summaries)."""

    name: str
    catalogue: Catalogue
    users: list[User]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.catalogue)

    def sites(self) -> list[str]:
        """Site names, largest (most users) first, ties by name."""
        counts = Counter(u.site for u in self.users)
        return sorted(counts, key=lambda s: (-counts[s], s))

    def subset(self, user_indices: list[int] | np.ndarray, name: str | None = None) -> "Dataset":
        """The same catalogue with only the given users (a site's partition)."""
        return Dataset(
            name=name or self.name,
            catalogue=self.catalogue,
            users=[self.users[int(i)] for i in user_indices],
            skipped=dict(self.skipped),
        )

    def summary(self) -> dict[str, object]:
        baskets = [len(u.baskets) for u in self.users]
        sizes = [len(b.items) for u in self.users for b in u.baskets]
        return {
            "dataset": self.name,
            "sites": len(self.sites()),
            "users": len(self.users),
            "items": self.num_items,
            "baskets": int(sum(baskets)),
            "interactions": int(sum(sizes)),
            "users_with_3plus_baskets": int(sum(n >= 3 for n in baskets)),
            "mean_baskets_per_user": float(np.mean(baskets)) if baskets else 0.0,
            "mean_items_per_basket": float(np.mean(sizes)) if sizes else 0.0,
            "label_columns": sorted(self.catalogue.labels),
            "skipped": dict(self.skipped),
        }


def build_users(
    *,
    rows: "list[tuple[str, str, str, float, int]]",
    shown: "dict[str, np.ndarray] | None" = None,
) -> list[User]:
    """Group (user_id, site, basket_key, timestamp, item_index) rows into users with sorted baskets.

    A basket's timestamp is its earliest event; a user's site is the site of most of their rows
    (ties: the first seen). ``shown`` maps a basket key to its shown candidates.
    """
    by_user: dict[str, dict[str, list]] = {}
    sites: dict[str, Counter] = {}
    for user_id, site, basket_key, timestamp, item in rows:
        baskets = by_user.setdefault(user_id, {})
        entry = baskets.get(basket_key)
        if entry is None:
            baskets[basket_key] = [timestamp, [item]]
        else:
            entry[0] = min(entry[0], timestamp)
            entry[1].append(item)
        sites.setdefault(user_id, Counter())[site] += 1
    users = []
    for user_id, baskets in by_user.items():
        ordered = sorted(baskets.items(), key=lambda kv: (kv[1][0], kv[0]))
        users.append(
            User(
                user_id=user_id,
                site=sites[user_id].most_common(1)[0][0],
                baskets=[
                    Basket(
                        timestamp=float(ts),
                        items=np.asarray(list(dict.fromkeys(items)), dtype=np.int64),
                        shown=None if shown is None else shown.get(key),
                    )
                    for key, (ts, items) in ordered
                ],
            )
        )
    return users
