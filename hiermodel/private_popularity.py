"""Item popularity released under user-level DP: the Gaussian mechanism on per-user-bounded counts
per week, from which both popularity features are read.

Plain popularity counts every user of a site, so it cannot feed DP-SGD as it is: removing one user
would change the features of every other user's per-sample gradient. Instead a private site
releases it once per run and trains on the release:

- the weeks are a public grid from the run config (dp.popularity-start, dp.popularity-weeks), never
  read from the site's data: the first or last basket is one user's, and a grid that moved with it
  would let that user change every cell;
- each user contributes the indicator of the distinct (week, item) pairs of their baskets in the
  grid, scaled to L2 norm 1 (1/√n for n pairs), so adding or removing one user moves the sum by at
  most 1;
- Gaussian noise of standard deviation σ is added to every cell (σ is the release's noise
  multiplier, the sensitivity being 1), and negative cells are clipped to 0 (post-processing).

The release is one Gaussian mechanism with sampling rate 1: the site's accountant composes it with
its DP-SGD steps, and the ledger records it so the audit composes it too.

Features at time t read whole weeks before t's week only, so a target basket (and anything later)
never informs its own features: "recent" is the WINDOW_WEEKS weeks before, "popularity" all weeks
before (where the plain feature counts the training baskets).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hiermodel.data.dataset import Dataset

SECONDS_PER_WEEK = 7 * 86_400.0
WINDOW_WEEKS = 4  # the plain feature's 30-day window, in whole weeks


def _week(timestamp: float, start: float) -> int:
    return int((timestamp - start) // SECONDS_PER_WEEK)


def week_grid(dataset: Dataset) -> tuple[float, int]:
    """Weeks (aligned to the Unix epoch) that cover a whole data set: what an operator who knows the
    data's date range would configure. A site must be given its grid, never derive it (see above)."""
    times = [b.timestamp for u in dataset.users for b in u.baskets]
    if not times:
        return 0.0, 0
    start = float(np.floor(min(times) / SECONDS_PER_WEEK) * SECONDS_PER_WEEK)
    return start, _week(max(times), start) + 1


def user_contributions(dataset: Dataset, *, start: float, weeks: int, users: Sequence[int] | None = None) -> np.ndarray:
    """The (weeks, items) sum over ``users`` (default: all) of each one's L2-normalised indicator of
    their (week, item) pairs inside the grid: the release before noise."""
    total = np.zeros((weeks, dataset.num_items), dtype=np.float64)
    for u in range(len(dataset.users)) if users is None else users:
        cells = {(w, int(i)) for b in dataset.users[u].baskets if 0 <= (w := _week(b.timestamp, start)) < weeks
                 for i in b.items}
        if cells:
            rows, cols = np.array(sorted(cells)).T
            total[rows, cols] += 1.0 / np.sqrt(len(cells))
    return total


@dataclass
class PopularityRelease:
    """A site's released weekly counts (noisy, clipped at 0) and what the features read from them."""

    start: float  # the time week 0 begins
    counts: np.ndarray  # (weeks, items)
    _by_week: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.float64)
        if self.counts.ndim != 2:
            raise ValueError(f"a popularity release is a (weeks, items) table, got shape {self.counts.shape}")
        # cumulative[w] = weeks before w; windows[w] = the WINDOW_WEEKS weeks before w
        self.cumulative = np.concatenate([np.zeros((1, self.counts.shape[1])), self.counts.cumsum(0)])
        self.windows = self.cumulative - self.cumulative[np.maximum(np.arange(len(self.cumulative)) - WINDOW_WEEKS, 0)]
        self._norms = (max(np.log1p(self.cumulative.max(initial=0.0)), 1e-9),
                       max(np.log1p(self.windows.max(initial=0.0)), 1e-9))

    @property
    def num_items(self) -> int:
        return self.counts.shape[1]

    def at(self, timestamp: float) -> tuple[np.ndarray, np.ndarray]:
        """(popularity, recent) per item for a prediction at ``timestamp``, each normalised to [0, 1]."""
        w = min(max(_week(timestamp, self.start), 0), len(self.cumulative) - 1)
        if w not in self._by_week:  # a few dozen weeks, asked for again and again
            self._by_week[w] = ((np.log1p(self.cumulative[w]) / self._norms[0]).astype(np.float32),
                                (np.log1p(self.windows[w]) / self._norms[1]).astype(np.float32))
        return self._by_week[w]

    def to_json(self) -> dict:
        return {"start": self.start, "counts": np.round(self.counts, 3).tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "PopularityRelease":
        return cls(start=float(data["start"]), counts=np.asarray(data["counts"], dtype=np.float64))

    @classmethod
    def empty(cls, num_items: int) -> "PopularityRelease":
        """No release yet: every popularity feature is 0."""
        return cls(start=0.0, counts=np.zeros((1, num_items)))


def release_popularity(
    dataset: Dataset, noise_multiplier: float, *, start: float, weeks: int, users: Sequence[int] | None = None
) -> PopularityRelease:
    """One DP release of the weekly item popularity of ``users`` (default: all) on the public grid
    (noise from OS randomness, so nobody can replay it)."""
    if not noise_multiplier > 0:
        raise ValueError(f"a private popularity release needs noise, got noise multiplier {noise_multiplier}")
    if weeks < 1:
        raise ValueError("a popularity release needs a public grid of at least one week (dp.popularity-weeks)")
    exact = user_contributions(dataset, start=start, weeks=weeks, users=users)
    rng = np.random.default_rng(secrets.randbits(128))
    return PopularityRelease(start=start, counts=np.maximum(exact + rng.normal(0.0, noise_multiplier, exact.shape), 0.0))
