"""Empirical privacy audit of one site with canary users, in one training run.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023): M canary
users, each put into the site's training data by its own secret fair coin; the site trains as the
run config says; an auditor who sees only the trained model guesses the coins of the canaries it is
surest about. If training is (ε, δ)-DP towards each user, the number of correct guesses is
stochastically small (Theorem 5.2 of the paper, below), so many correct guesses refute ε: the
largest ε refuted at the stated confidence is a lower bound on what the run really leaks.

The ledger audit checks the arithmetic of the accountant; this checks the wiring (noise added,
clipping applied, one accountant for the run) from the outside.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binom

from hiermodel.data.dataset import Basket, Catalogue, Dataset, User
from hiermodel.data.split import Example, train_popularity
from hiermodel.errors import ConfigError, DataError
from hiermodel.features import FeatureBuilder
from hiermodel.pipeline import new_model
from hiermodel.run_config import RunConfig

DEFAULT_CANARIES = 200
DEFAULT_CONFIDENCE = 0.95
# r (guesses) tried, as fractions of M, half IN (highest scores) and half OUT (lowest); each is
# tested at (1 - confidence) / len(...) so that the best of them holds at the stated confidence
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)
HISTORY_ITEMS = 2  # a canary's first basket: items of its own that nobody else has
TARGET_ITEMS = 1  # its second basket, the training target: again its own items
_DESIGN_SEED = 20231210  # the canaries' texts are public, fixed; only the coins are secret
WORDS_PER_ITEM = 3
RUN_CONFIG_FILE = "run_config.json"
PARTITIONS_DIR = "partitions"


# -- the bound ----------------------------------------------------------------------------------

def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P[at least v of r guesses correct] bounded under the hypothesis that training is (ε, δ)-DP.

    Theorem 5.2 of the paper: with f(x) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ x] (ε-DP randomized
    response is the best guesser),
        P[W ≥ v] ≤ f(v) + 2 m δ · max_{i ≥ 1} (f(v − i) − f(v)) / i.
    For i > v, f(v − i) = 1 and the ratio only falls with i, so i runs over 1 … v.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m} r={r} v={v}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = binom.sf(v - 1, r, q)  # f(v)
    if delta == 0 or v == 0:
        return float(min(1.0, tail))
    gaps = binom.sf(v - 1 - np.arange(1, v + 1), r, q) - tail  # f(v - i) - f(v), i = 1 … v
    worst = float(np.max(gaps / np.arange(1, v + 1)))
    return float(min(1.0, tail + 2 * m * delta * worst))


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float = 0.0, confidence: float = DEFAULT_CONFIDENCE,
                        tol: float = 1e-4) -> float:
    """The largest ε that v correct of r guesses refute at ``confidence``: sup{ε : p_value < 1 − confidence}.

    p_value grows with ε (a looser guarantee explains more correct guesses), so bisect; 0 when even
    ε = 0 is not refuted.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < alpha:
        low, high = high, 2 * high
        if high > 1e3:  # cannot happen for v <= r; a guard against an endless loop
            return math.inf
    while high - low > tol:
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < alpha else (low, mid)
    return low


@dataclasses.dataclass
class Guesses:
    guesses: int  # r
    correct: int  # v
    epsilon_lower_bound: float


def guesses_tried(scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float,
                  fractions: tuple[float, ...] = GUESS_FRACTIONS) -> list[Guesses]:
    """For each r in ``fractions`` of M: IN for the r/2 highest scores, OUT for the r/2 lowest, the
    rest abstained; each bound at 1 − (1 − confidence)/len(fractions), so that the largest of them
    holds at ``confidence`` (a union bound over the choices of r)."""
    m = len(scores)
    included = np.asarray(included, dtype=bool)
    order = np.argsort(-np.asarray(scores), kind="stable")
    per_choice = 1.0 - (1.0 - confidence) / len(fractions)
    tried = []
    for half in sorted({max(1, min(m // 2, int(round(f * m / 2)))) for f in fractions}):
        guessed_in, guessed_out = order[:half], order[m - half:]
        correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
        tried.append(Guesses(2 * half, correct, epsilon_lower_bound(m, 2 * half, correct, delta=delta,
                                                                    confidence=per_choice)))
    return tried


# -- the canaries -------------------------------------------------------------------------------

def _backbone_words(backbone: str) -> list[str]:
    """Whole lowercase words of the backbone's vocabulary (the LM gives each its own vector; made-up
    words would split into pieces or end up as [UNK], alike for every canary)."""
    from transformers import AutoTokenizer

    from hiermodel.backbone import resolve_backbone

    path = resolve_backbone(backbone)
    vocab = AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir()).get_vocab()
    return sorted(w for w in vocab if w.isascii() and w.isalpha() and w.islower() and 5 <= len(w) <= 10)


@dataclasses.dataclass
class Canaries:
    """The site's data with M canary users appended (every one, whatever its coin), and their items."""

    dataset: Dataset  # catalogue = the site's + the canaries' items; users = the site's, then the canaries
    first_user: int  # dataset.users[first_user + i] is canary i
    targets: list[np.ndarray]  # canary i's target items

    @property
    def count(self) -> int:
        return len(self.targets)

    def training_data(self, included: np.ndarray) -> Dataset:
        """The site's users plus the canaries whose coin came up IN, over the same catalogue."""
        users = self.dataset.users[: self.first_user] + [
            self.dataset.users[self.first_user + i] for i in np.flatnonzero(included)]
        return Dataset(self.dataset.name, self.dataset.catalogue, users, dict(self.dataset.skipped))


def make_canaries(dataset: Dataset, count: int, *, backbone: str) -> Canaries:
    """``count`` canary users, each with its own new items: a first basket of HISTORY_ITEMS and a
    target basket of TARGET_ITEMS that no other user has, so only a canary's own presence can teach
    the model that its history leads to its target. Each text is WORDS_PER_ITEM words of the
    backbone's vocabulary that no other canary item and no catalogue text uses, drawn with a fixed,
    public seed: the design is no secret, only the coins are."""
    if count < 2:
        raise ConfigError(f"--canaries must be at least 2, got {count}")
    per_canary = HISTORY_ITEMS + TARGET_ITEMS
    used = {w for text in dataset.catalogue.texts for w in text.lower().split()}
    words = [w for w in _backbone_words(backbone) if w not in used]
    needed = count * per_canary * WORDS_PER_ITEM
    if len(words) < WORDS_PER_ITEM:
        raise ConfigError(f"backbone {backbone!r} has too few whole words in its vocabulary for canary texts")
    rng = np.random.default_rng(_DESIGN_SEED)
    drawn = rng.choice(len(words), size=needed, replace=needed > len(words))  # distinct words while they last
    texts = [" ".join(words[k] for k in drawn[j:j + WORDS_PER_ITEM]) for j in range(0, needed, WORDS_PER_ITEM)]
    base = dataset.num_items
    ids = [f"canary-item-{k:05d}" for k in range(len(texts))]
    labels = {name: values + ["canary"] * len(texts) for name, values in dataset.catalogue.labels.items()}
    catalogue = Catalogue(dataset.catalogue.item_ids + ids, dataset.catalogue.texts + texts, labels)
    times = [b.timestamp for u in dataset.users for b in u.baskets]
    start = float(np.median(times)) if times else 0.0
    site = dataset.users[0].site if dataset.users else dataset.name
    users, targets = [], []
    for i in range(count):
        own = base + i * per_canary + np.arange(per_canary, dtype=np.int64)
        history, target = own[:HISTORY_ITEMS], own[HISTORY_ITEMS:]
        users.append(User(f"canary-{i:05d}", site, [Basket(start, history), Basket(start + 86_400.0, target)]))
        targets.append(target)
    augmented = Dataset(dataset.name, catalogue, list(dataset.users) + users, dict(dataset.skipped))
    return Canaries(augmented, len(dataset.users), targets)


def _secret_seed() -> int:
    return secrets.randbits(128)


def draw_coins(count: int, seed: int | None = None) -> np.ndarray:
    """Each canary IN with probability 1/2. From OS randomness unless a test fixes ``seed``: nothing
    the trainer sees (the run config, its own seeds) can replay them."""
    rng = np.random.default_rng(_secret_seed() if seed is None else seed)
    return rng.random(count) < 0.5


# -- training and scoring -----------------------------------------------------------------------

@torch.no_grad()
def canary_scores(model, builder: FeatureBuilder, canaries: Canaries, *, batch_size: int = 64) -> np.ndarray:
    """Per canary, the model's mean log-softmax (over the whole catalogue) of its target items given
    its history: how strongly the model predicts what only the canary itself could have taught it."""
    model.eval()
    out = np.empty(canaries.count)
    for start in range(0, canaries.count, batch_size):
        rows = range(start, min(start + batch_size, canaries.count))
        history, candidates = builder.ranking_batch([Example(canaries.first_user + i, 1) for i in rows])
        log_p = torch.log_softmax(model(history, candidates).scores, dim=-1).numpy()
        for k, i in enumerate(rows):
            out[i] = float(log_p[k, canaries.targets[i]].mean())
    return out


@dataclasses.dataclass
class EmpiricalAudit:
    site: str
    canaries: int  # M
    included: int  # canaries whose coin put them into training (the auditor does not know which)
    confidence: float
    dp_enabled: bool
    claimed_epsilon: float  # what the site's accountant reports after training; inf without DP
    budget_epsilon: float
    delta: float  # the site's δ, at which the bound is taken
    guesses: int  # r
    correct: int  # v
    epsilon_lower_bound: float
    tried: list[dict]  # every r tried: guesses, correct, bound at the union-bound-corrected confidence
    rounds: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    seconds: float

    @property
    def verdict(self) -> str:
        if not self.dp_enabled:
            return "no-dp"
        return "fail" if self.epsilon_lower_bound > self.claimed_epsilon else "pass"

    @property
    def ok(self) -> bool:
        return self.verdict != "fail"

    def explanation(self) -> str:
        if self.verdict == "no-dp":
            return ("trained without DP (dp.enabled=false): the claimed ε is infinite, nothing to refute; "
                    "the bound shows how much the canaries leak")
        if self.verdict == "fail":
            return (f"the site leaks more than it claims: ε ≥ {self.epsilon_lower_bound:.3f} at "
                    f"{self.confidence:.0%} confidence, above the claimed {self.claimed_epsilon:.3f}")
        return "no contradiction: the lower bound does not exceed the claimed ε (which does not prove the claim)"

    def to_dict(self) -> dict:
        out = {**dataclasses.asdict(self), "verdict": self.verdict, "ok": self.ok, "explanation": self.explanation()}
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def audit_site(
    dataset: Dataset,
    config: RunConfig,
    *,
    site: str | None = None,
    canaries: int = DEFAULT_CANARIES,
    confidence: float = DEFAULT_CONFIDENCE,
    coin_seed: int | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> EmpiricalAudit:
    """Insert canaries into one site's data, train the site alone as the run config says, score the
    canaries with the trained model and bound ε from below.

    The site alone, round after round from its own update, is the strongest case of its guarantee:
    the guarantee covers every update the site sends (the server sees them as they are), and here
    the final model is the site's last update, with no other site's update averaged in to hide it.
    """
    from hiermodel.site_trainer import SiteTrainer  # the same training path as a federated site

    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence must be between 0 and 1, got {confidence}")
    started = time.perf_counter()
    design = make_canaries(dataset, canaries, backbone=config.model.backbone)
    included = draw_coins(canaries, coin_seed)
    trainer = SiteTrainer(design.training_data(included), config.model, private=config.dp.enabled)
    log(f"site {site or dataset.name}: {len(dataset.users)} users + {canaries} canaries (each IN by a secret coin), "
        f"{design.dataset.num_items} items, {config.fed.rounds} rounds × {config.fed.local_epochs} local epochs")
    plan = (trainer.privacy_plan(config.dp, batch_size=config.train.batch_size, local_epochs=config.fed.local_epochs,
                                 planned_rounds=config.fed.rounds) if config.dp.enabled else None)
    model = new_model(trainer.config, seed=config.train.seed)  # the server's initial state
    state = model.trainable_state()
    mu = config.fed.proximal_mu if config.fed.strategy == "fedprox" else 0.0
    for server_round in range(1, config.fed.rounds + 1):
        result = trainer.train(state, train_config=config.train, local_epochs=config.fed.local_epochs,
                               server_round=server_round, proximal_mu=mu, privacy=plan, dp_config=config.dp)
        state = result.state  # the next round starts from the site's own update
        log(f"round {server_round}/{config.fed.rounds}: loss {result.metrics['loss']:.4f}"
            + (f", ε {plan.epsilon():.3f} of {plan.budget_epsilon:g}" if plan is not None else ""))
    # score on the data with every canary, whatever its coin. Popularity: under DP the site's release
    # (the mechanism's own output, which the IN canaries took part in); else the site's own users
    # only, so that no feature counts the included canaries
    if plan is not None:
        popularity = trainer.builder.popularity
    else:
        popularity = np.concatenate([train_popularity(dataset), np.zeros(design.dataset.num_items - dataset.num_items)])
    scorer = FeatureBuilder(dataset=design.dataset, encodings=trainer.builder.encodings, config=trainer.config,
                            popularity=popularity)
    model.load_trainable_state(state)
    scores = canary_scores(model, scorer, design)
    delta = plan.delta if plan is not None else (config.dp.target_delta or 1.0 / (10 * len(trainer.targets)))
    tried = guesses_tried(scores, included, delta=delta, confidence=confidence)
    best = max(tried, key=lambda g: g.epsilon_lower_bound)
    return EmpiricalAudit(
        site=site or dataset.name, canaries=canaries, included=int(included.sum()), confidence=confidence,
        dp_enabled=plan is not None, claimed_epsilon=plan.epsilon() if plan is not None else math.inf,
        budget_epsilon=plan.budget_epsilon if plan is not None else math.inf, delta=delta,
        guesses=best.guesses, correct=best.correct, epsilon_lower_bound=best.epsilon_lower_bound,
        tried=[dataclasses.asdict(g) for g in tried], rounds=config.fed.rounds,
        steps=plan.total_steps if plan is not None else 0,
        noise_multiplier=plan.noise_multiplier if plan is not None else 0.0,
        sample_rate=plan.sample_rate if plan is not None else 0.0, seconds=time.perf_counter() - started,
    )


# -- a run directory ----------------------------------------------------------------------------

def load_site(run_dir: Path, site: str) -> tuple[Dataset, RunConfig]:
    """The named site's partition and the run config of a run directory (`hierfed simulate` wrote both)."""
    from hiermodel.data.store import MANIFEST, load_dataset_folder, read_manifest

    run_dir = Path(run_dir)
    config_file = run_dir / RUN_CONFIG_FILE
    if not config_file.is_file():
        raise DataError(f"{run_dir}: no {RUN_CONFIG_FILE}; pass the folder `hierfed simulate --out` wrote")
    try:
        config = RunConfig.from_flat(json.loads(config_file.read_text()))
    except (OSError, ValueError) as exc:
        raise DataError(f"{config_file}: cannot read the run config ({exc})") from None
    folder = Path(config.fed.partitions_dir) if config.fed.partitions_dir else run_dir / PARTITIONS_DIR
    if not (folder / MANIFEST).is_file() and (run_dir / PARTITIONS_DIR / MANIFEST).is_file():
        folder = run_dir / PARTITIONS_DIR  # the run directory was moved: its own partitions
    if not (folder / MANIFEST).is_file():
        raise DataError(f"{run_dir}: no partitions ({folder / MANIFEST} is missing); the empirical audit needs the sites' data")
    manifest = read_manifest(folder)
    names = [str(entry["site"]) for entry in manifest]
    if site not in names:
        raise ConfigError(f"unknown site {site!r} in {run_dir}; valid: {', '.join(names)}")
    entry = manifest[names.index(site)]
    return load_dataset_folder(folder / str(entry["partition"])), config


def report_path(run_dir: Path, site: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in site)
    return Path(run_dir) / f"empirical-audit-{safe}.json"


def write_report(audit: EmpiricalAudit, path: Path) -> Path:
    """The report as JSON, written to a temporary file and renamed: never half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(audit.to_dict(), indent=2))
    tmp.replace(path)
    return path


def format_report(audit: EmpiricalAudit) -> str:
    """The audit as a two-column table and its verdict."""
    claimed = f"{audit.claimed_epsilon:.4f}" if math.isfinite(audit.claimed_epsilon) else "inf (no DP)"
    rows = [
        ("site", audit.site),
        ("claimed ε", claimed),
        ("budget ε", f"{audit.budget_epsilon:g}"),
        ("δ", f"{audit.delta:.3g}"),
        ("empirical ε lower bound", f"{audit.epsilon_lower_bound:.4f}"),
        ("confidence", f"{audit.confidence:g}"),
        ("canaries M", str(audit.canaries)),
        ("guesses r", str(audit.guesses)),
        ("correct v", str(audit.correct)),
        ("rounds, steps", f"{audit.rounds}, {audit.steps}"),
        ("σ, q", f"{audit.noise_multiplier:.4g}, {audit.sample_rate:.4g}"),
        ("verdict", audit.verdict.upper()),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"empirical privacy audit (one run, {audit.canaries} canaries) in {audit.seconds:.1f}s", ""]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join([*lines, "", audit.explanation()])
