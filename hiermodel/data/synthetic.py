"""A seeded synthetic retail data set whose item texts reveal a topic -> subtopic -> item hierarchy.

Users prefer 1-2 topics and 1-3 subtopics within each; sites differ in their topic mix; baskets
mix repeats with new items of the user's subtopics, so text plus history beats popularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hiermodel.data.dataset import Basket, Catalogue, Dataset, User
from hiermodel.errors import ConfigError

# Topic word -> its subtopic nouns: every title names its topic and its subtopic.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "KITCHEN": ("TEAPOT", "MUG", "JUG", "APRON", "SPATULA", "COLANDER"),
    "GARDEN": ("LANTERN", "PLANTER", "TROWEL", "BIRDHOUSE", "SPRINKLER", "WINDCHIME"),
    "CHRISTMAS": ("BAUBLE", "STOCKING", "WREATH", "GARLAND", "NUTCRACKER", "SNOWGLOBE"),
    "PARTY": ("BUNTING", "NAPKINS", "BALLOONS", "STREAMERS", "CONFETTI", "PINATA"),
    "NURSERY": ("TEDDY", "RATTLE", "NIGHTLIGHT", "BIB", "BLANKET", "MOBILE"),
    "OFFICE": ("NOTEBOOK", "STAPLER", "PAPERWEIGHT", "BOOKEND", "CLIPBOARD", "ORGANISER"),
    "BATHROOM": ("TOWEL", "SOAPDISH", "TOOTHBRUSH", "BATHMAT", "LOOFAH", "WASHBAG"),
    "TRAVEL": ("SUITCASE", "PASSPORT", "PILLOW", "LUGGAGETAG", "MAPCASE", "FLASK"),
    "PICNIC": ("HAMPER", "RUG", "TUMBLER", "COOLBAG", "CUTLERY", "PLATTER"),
    "CRAFT": ("SCISSORS", "RIBBON", "STENCIL", "BUTTONS", "YARN", "GLITTER"),
    "PET": ("COLLAR", "LEASH", "KENNEL", "SCRATCHER", "CHEWTOY", "FEEDER"),
    "WEDDING": ("VEIL", "GARTER", "GUESTBOOK", "CAKETOPPER", "FAVOURBOX", "TIARA"),
}
ADJECTIVES = (
    "VINTAGE", "RETRO", "CLASSIC", "MODERN", "RUSTIC", "DELUXE", "MINI", "JUMBO",
    "ANTIQUE", "HANDMADE", "SPOTTY", "STRIPED", "FLORAL", "SCANDI", "REGENCY", "FRENCH",
)
COLOURS = ("RED", "BLUE", "GREEN", "PINK", "WHITE", "BLACK", "IVORY", "GOLD", "SILVER", "PASTEL")
MATERIALS = ("CERAMIC", "WOODEN", "GLASS", "METAL", "ENAMEL", "PAPER", "CANVAS", "FELT", "ZINC", "WICKER")
_COMBINATIONS = len(ADJECTIVES) * len(COLOURS) * len(MATERIALS)
_SYLLABLES = ("BA", "KO", "LU", "MI", "RE", "SA", "TO", "VE", "ZU", "NI", "DA", "PO")
START_TIME = 1_609_459_200.0  # 2021-01-01 00:00:00 UTC
DAY = 86_400.0


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and mixing knobs of the synthetic generator (the defaults give 600 users, 360 items)."""

    seed: int = 0
    num_sites: int = 4
    num_users: int = 600
    num_topics: int = 6
    subtopics_per_topic: int = 4
    items_per_subtopic: int = 15
    mean_baskets: float = 8.0  # baskets per user: 1 + Poisson(mean - 1)
    mean_basket_size: float = 5.0  # items per basket: 1 + Poisson(mean - 1)
    repeat_prob: float = 0.45  # an item slot repeats an earlier purchase of the user
    random_prob: float = 0.1  # a slot that is no repeat draws from the whole catalogue, not the user's subtopics
    site_topic_concentration: float = 0.5  # Dirichlet alpha of a site's topic mix; small = distinct sites
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity within a subtopic
    mean_gap_days: float = 7.0  # baskets are 1 + Exponential(mean - 1) days apart

    def __post_init__(self) -> None:
        at_least_one = (
            "num_sites", "num_users", "num_topics", "subtopics_per_topic", "items_per_subtopic",
            "mean_baskets", "mean_basket_size", "mean_gap_days",
        )
        for name in at_least_one:
            if not getattr(self, name) >= 1:
                raise ConfigError(f"synthetic: {name} must be >= 1 (got {getattr(self, name)})")
        if not self.site_topic_concentration > 0:
            raise ConfigError(f"synthetic: site_topic_concentration must be > 0 (got {self.site_topic_concentration})")
        for name in ("repeat_prob", "random_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"synthetic: {name} must be between 0 and 1 (got {getattr(self, name)})")
        if self.items_per_subtopic > _COMBINATIONS:
            raise ConfigError(f"synthetic: items_per_subtopic must be <= {_COMBINATIONS} (distinct titles)")

    @property
    def num_items(self) -> int:
        return self.num_topics * self.subtopics_per_topic * self.items_per_subtopic


def _pseudo_word(k: int) -> str:
    """A stable made-up word for vocabularies larger than the built-in one."""
    word = ""
    for _ in range(4):
        k, r = divmod(k, len(_SYLLABLES))
        word += _SYLLABLES[r]
    return word


def _vocabulary(num_topics: int, subtopics: int) -> list[tuple[str, list[str]]]:
    """(topic word, subtopic nouns) per topic, padded with made-up words where the built-in lists end."""
    builtin = list(VOCABULARY.items())
    out = []
    for t in range(num_topics):
        word, nouns = builtin[t] if t < len(builtin) else (_pseudo_word(t), ())
        # Made-up nouns end in S and topic words do not, so the two never collide.
        padded = [nouns[s] if s < len(nouns) else f"{_pseudo_word(t * subtopics + s)}S" for s in range(subtopics)]
        out.append((word, padded))
    return out


def _catalogue(config: SyntheticConfig, rng: np.random.Generator) -> Catalogue:
    """Items grouped by subtopic: titles '<ADJECTIVE> <COLOUR> <MATERIAL> <TOPIC> <NOUN>', unique per subtopic."""
    width = max(4, len(str(config.num_items)))
    ids, texts, topics, subtopics = [], [], [], []
    for word, nouns in _vocabulary(config.num_topics, config.subtopics_per_topic):
        for noun in nouns:
            for c in rng.choice(_COMBINATIONS, size=config.items_per_subtopic, replace=False):
                adjective, rest = divmod(int(c), len(COLOURS) * len(MATERIALS))
                colour, material = divmod(rest, len(MATERIALS))
                ids.append(f"S{len(ids) + 1:0{width}d}")
                texts.append(f"{ADJECTIVES[adjective]} {COLOURS[colour]} {MATERIALS[material]} {word} {noun}")
                topics.append(word)
                subtopics.append(noun)
    return Catalogue(item_ids=ids, texts=texts, labels={"topic": topics, "subtopic": subtopics})


def _popularity(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Per subtopic, a Zipf-shaped distribution over its items (ranks shuffled): shape (subtopics, items)."""
    ranks = np.arange(1, config.items_per_subtopic + 1, dtype=np.float64) ** -config.popularity_exponent
    num_subtopics = config.num_topics * config.subtopics_per_topic
    weights = np.stack([rng.permutation(ranks) for _ in range(num_subtopics)])
    return weights / weights.sum(axis=1, keepdims=True)


def _interests(config: SyntheticConfig, *, site_mix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A user's weight per subtopic: 1-2 topics drawn from the site's mix, 1-3 subtopics within each."""
    mix = site_mix + 1e-9  # keep every topic possible however peaked the Dirichlet draw
    topics = rng.choice(config.num_topics, size=min(int(rng.integers(1, 3)), config.num_topics),
                        replace=False, p=mix / mix.sum())
    weights = np.zeros(config.num_topics * config.subtopics_per_topic)
    for topic in topics:
        count = min(int(rng.integers(1, 4)), config.subtopics_per_topic)
        local = rng.choice(config.subtopics_per_topic, size=count, replace=False)
        chosen = int(topic) * config.subtopics_per_topic + local
        weights[chosen] = rng.dirichlet(np.ones(count)) * rng.uniform(0.5, 1.0)
    return weights / weights.sum()


def _basket(
    config: SyntheticConfig,
    *,
    interests: np.ndarray,
    bought: dict[int, int],
    popularity: np.ndarray,
    overall: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """One basket: repeats of earlier purchases (by frequency), new items of the user's subtopics, some random."""
    size = 1 + int(rng.poisson(config.mean_basket_size - 1.0))
    chosen: dict[int, None] = {}  # insertion-ordered set
    for _ in range(4 * size):  # a few extra draws make up for duplicates within the basket
        if len(chosen) == size:
            break
        if bought and rng.random() < config.repeat_prob:
            counts = np.fromiter(bought.values(), dtype=np.float64, count=len(bought))
            item = list(bought)[int(rng.choice(len(bought), p=counts / counts.sum()))]
        elif rng.random() < config.random_prob:
            item = int(rng.choice(len(overall), p=overall))
        else:
            subtopic = int(rng.choice(len(interests), p=interests))
            offset = int(rng.choice(config.items_per_subtopic, p=popularity[subtopic]))
            item = subtopic * config.items_per_subtopic + offset
        chosen[item] = None
    for item in chosen:
        bought[item] = bought.get(item, 0) + 1
    return np.fromiter(chosen, dtype=np.int64, count=len(chosen))


def generate_synthetic(config: SyntheticConfig | None = None) -> Dataset:
    """A deterministic synthetic Dataset for ``config`` (default SyntheticConfig())."""
    config = config or SyntheticConfig()
    rng = np.random.default_rng(config.seed)
    catalogue = _catalogue(config, rng)
    popularity = _popularity(config, rng)
    site_mixes = rng.dirichlet(np.full(config.num_topics, config.site_topic_concentration), size=config.num_sites)
    # Site sizes are skewed (one home market, smaller export ones); the first users give every site one.
    site_weights = 1.0 / np.arange(1, config.num_sites + 1)
    extra = max(0, config.num_users - config.num_sites)
    sites = np.concatenate([
        np.arange(min(config.num_sites, config.num_users)),
        rng.choice(config.num_sites, size=extra, p=site_weights / site_weights.sum()),
    ])
    # The random slots follow the catalogue-wide popularity: the average site's topic mix times item skew.
    overall = (site_mixes.mean(axis=0).repeat(config.subtopics_per_topic)[:, None] * popularity).ravel()
    overall /= overall.sum()
    width = max(4, len(str(config.num_users)))

    users = []
    for u in range(config.num_users):
        interests = _interests(config, site_mix=site_mixes[sites[u]], rng=rng)
        bought: dict[int, int] = {}  # item -> times bought
        timestamp = START_TIME + rng.uniform(0.0, 60.0) * DAY
        baskets = []
        for _ in range(1 + int(rng.poisson(config.mean_baskets - 1.0))):
            items = _basket(config, interests=interests, bought=bought, popularity=popularity, overall=overall, rng=rng)
            baskets.append(Basket(timestamp=float(round(timestamp)), items=items))
            timestamp += (1.0 + rng.exponential(config.mean_gap_days - 1.0)) * DAY  # at least a day apart
        users.append(User(user_id=f"u{u + 1:0{width}d}", site=f"site-{int(sites[u])}", baskets=baskets))
    return Dataset(name="synthetic", catalogue=catalogue, users=users)
