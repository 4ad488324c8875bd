"""Item popularity released under user-level DP: the Gaussian mechanism on per-user-bounded counts.

Plain popularity counts every user of a site, so it cannot feed DP-SGD as it is: removing one user
would change the features of every other user's per-sample gradient. Instead a private site
releases it once per run and trains on the release:

- each user contributes the indicator vector of the distinct items in their training baskets,
  scaled to L2 norm 1 (1/√n for n items), so adding or removing one user moves the sum by at most 1;
- Gaussian noise of standard deviation σ is added to every item's sum (σ is the release's noise
  multiplier, the sensitivity being 1), and negative values are clipped to 0 (post-processing).

The release is one Gaussian mechanism with sampling rate 1: the site's accountant composes it with
its DP-SGD steps, and the ledger records it so the audit composes it too.
"""

from __future__ import annotations

import secrets

import numpy as np

from hiermodel.data.dataset import Dataset
from hiermodel.data.split import train_baskets


def user_contributions(dataset: Dataset) -> np.ndarray:
    """Σ over users of each user's L2-normalised indicator of their training items (no noise yet)."""
    total = np.zeros(dataset.num_items, dtype=np.float64)
    for user in dataset.users:
        items = np.unique(np.concatenate([b.items for b in train_baskets(user)] or [np.zeros(0, np.int64)]))
        if items.size:
            total[items] += 1.0 / np.sqrt(items.size)
    return total


def release_popularity(dataset: Dataset, noise_multiplier: float) -> np.ndarray:
    """One DP release of the site's item popularity (noise from OS randomness, so nobody can replay it)."""
    if not noise_multiplier > 0:
        raise ValueError(f"a private popularity release needs noise, got noise multiplier {noise_multiplier}")
    rng = np.random.default_rng(secrets.randbits(128))
    noisy = user_contributions(dataset) + rng.normal(0.0, noise_multiplier, dataset.num_items)
    return np.maximum(noisy, 0.0)
