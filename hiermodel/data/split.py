"""Leave-last-basket-out split: last basket = test, the one before = validation.

A target basket's features come only from the baskets before it. Users with at least
``min_baskets`` baskets are evaluated; their other baskets (from the second on) are training
targets, as are all baskets from the second on of users with fewer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hiermodel.data.dataset import Dataset

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One prediction task: user ``user`` (index into dataset.users), target basket ``target``."""

    user: int
    target: int


def split_examples(dataset: Dataset, split: str, *, min_baskets: int = 3) -> list[Example]:
    """Every example of one split, in user order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    examples: list[Example] = []
    for u, user in enumerate(dataset.users):
        n = len(user.baskets)
        evaluated = n >= min_baskets
        if split == "test" and evaluated:
            examples.append(Example(u, n - 1))
        elif split == "validation" and evaluated:
            examples.append(Example(u, n - 2))
        elif split == "train":
            last = n - 3 if evaluated else n - 1
            examples.extend(Example(u, t) for t in range(1, last + 1))
    return examples


def train_targets_by_user(dataset: Dataset, *, min_baskets: int = 3) -> dict[int, list[int]]:
    """User index -> its training target baskets (only users that have any)."""
    out: dict[int, list[int]] = {}
    for ex in split_examples(dataset, "train", min_baskets=min_baskets):
        out.setdefault(ex.user, []).append(ex.target)
    return out


def train_popularity(dataset: Dataset, *, min_baskets: int = 3) -> np.ndarray:
    """Per item, the number of baskets containing it, counting no validation or test basket."""
    counts = np.zeros(dataset.num_items, dtype=np.float64)
    for user in dataset.users:
        n = len(user.baskets)
        stop = n - 2 if n >= min_baskets else n
        for basket in user.baskets[:stop]:
            counts[basket.items] += 1
    return counts
