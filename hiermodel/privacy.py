"""User-level DP-SGD for one site (Opacus): the budget, the accountant that lives for the whole run,
and one private round of local training.

The unit of privacy is a user of the site. Each step samples users by Poisson sampling (rate q);
a sampled user contributes one target basket, scored against candidates built from that user's
own history and public catalogue items only (never other users' baskets: no in-batch negatives),
so one user's data touches one per-sample gradient,
which is clipped to the clip norm before Gaussian noise is added.

A training record is a user with up to dp.baskets-per-user target baskets per step.

The popularity features are a second mechanism: a Gaussian release of per-user-bounded weekly counts
at the site's first round (hiermodel.private_popularity), composed with the steps by the same accountant.
"""

from __future__ import annotations

import json
import math
import secrets
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer

from hiermodel.data.split import Example
from hiermodel.errors import ConfigError
from hiermodel.features import FeatureBuilder
from hiermodel.model import HierModel

ACCOUNTANTS = ("prv", "rdp")
ACCOUNTANT_CODES = {"prv": 0, "rdp": 1}  # metrics carry numbers only
CENTRAL_MODES = ("off", "server-side", "client-side")
FROZEN_CHOICES = ("none", "projections", "all-but-head")
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class DPConfig:
    """Run config group `dp.*`."""

    enabled: bool = True
    target_epsilon: float = 8.0  # each site's budget for the whole run
    target_delta: float = 0.0  # 0: 1 / (10 × the site's users)
    noise_multiplier: float = 0.0  # 0: calibrated so the planned rounds spend exactly the budget
    max_grad_norm: float = 1.0  # per-user clip norm
    accountant: str = "prv"  # prv | rdp (Opacus)
    negatives: str = "catalogue"  # catalogue: every (public) item is a candidate; sampled: own + random items
    random_negatives: int = 300  # sampled: public catalogue items drawn beside each user's own candidates
    # the popularity release's noise is set so that on its own it would cost this share of the budget
    # (composed with the steps it costs far less); 0: no popularity features under DP
    popularity_share: float = 0.25
    # the release's public week grid: week 0 starts at popularity_start (Unix seconds); 0 weeks: no
    # release (the grid must not come from a site's data; `hierfed simulate` sets it from the data set's dates)
    popularity_start: float = 0.0
    popularity_weeks: int = 0
    # at most this many target baskets of a sampled user go into a step; with m of them, each is
    # clipped to max-grad-norm / m, so that the user's whole contribution stays within max-grad-norm
    baskets_per_user: int = 1
    # the share of the clip norm's square kept for the model's head (HierModel.head_parameters): a user's
    # gradient on the head is clipped to C·√share and on the rest to C·√(1 − share), so together it
    # stays within C (the noise and the accounting are those of C); 0: one clip over all values
    head_clip_share: float = 0.0
    # values a DP round leaves as the global model has them, so that the noise spreads over fewer:
    # none; projections (HierModel.projection_parameters: the three backbone -> d text projections,
    # 60 % of the values); all-but-head (only HierModel.head_parameters train)
    frozen: str = "none"
    # the dtype of the item tower's per-user gradient products (most of a DP step's extra work): auto is
    # bfloat16 where the CPU multiplies it natively (AVX-512 BF16; 4 × float32's speed here), else float32.
    # The gradients that are clipped are the ones summed, so the guarantee holds at either precision.
    grad_sample_precision: str = "auto"
    # optional client-level central DP on top (Flower's fixed-clipping wrappers and RDP accountant):
    # each site's whole update is clipped to central-clip-norm, the uniform average gets Gaussian noise
    central: str = "off"  # off | server-side (the server clips) | client-side (each site clips)
    central_target_epsilon: float = 8.0  # the federation's budget over fed.rounds, a whole site as the unit
    central_target_delta: float = 0.0  # 0: 1 / (10 × the sites connected when the run starts)
    central_noise_multiplier: float = 0.0  # 0: calibrated so fed.rounds releases spend central-target-epsilon
    central_clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown dp.accountant {self.accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
        if self.target_epsilon <= 0:  # checked with DP off too: a bad value is a mistake either way
            raise ConfigError(f"dp.target-epsilon must be positive, got {self.target_epsilon}")
        if self.max_grad_norm <= 0 or self.noise_multiplier < 0 or not 0 <= self.target_delta < 1:
            raise ConfigError("dp.max-grad-norm must be > 0, dp.noise-multiplier >= 0, 0 <= dp.target-delta < 1")
        if not 0 <= self.head_clip_share < 1:
            raise ConfigError(f"dp.head-clip-share must be in [0, 1) (0: one clip norm for all values), got {self.head_clip_share}")
        if self.frozen not in FROZEN_CHOICES:
            raise ConfigError(f"unknown dp.frozen {self.frozen!r}; valid: {', '.join(FROZEN_CHOICES)}")
        if self.grad_sample_precision not in PRECISIONS:
            raise ConfigError(f"unknown dp.grad-sample-precision {self.grad_sample_precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.frozen != "none" and not self.enabled:
            raise ConfigError(f"dp.frozen={self.frozen} applies to DP rounds only, and DP is off (--no-dp): drop it")
        if self.frozen == "all-but-head" and self.head_clip_share:
            raise ConfigError("dp.head-clip-share splits the clip norm between the head and the rest, but "
                              "dp.frozen=all-but-head trains the head alone: set one of them")
        if not 0 <= self.popularity_share < 1:
            raise ConfigError(f"dp.popularity-share must be in [0, 1) (0: no popularity features), got {self.popularity_share}")
        if self.central not in CENTRAL_MODES:
            raise ConfigError(f"unknown dp.central {self.central!r}; valid: {', '.join(CENTRAL_MODES)}")
        if self.central != "off":
            for key, value, valid, what in (
                ("central-target-epsilon", self.central_target_epsilon, self.central_target_epsilon > 0, "> 0"),
                ("central-clip-norm", self.central_clip_norm, self.central_clip_norm > 0, "> 0"),
                ("central-noise-multiplier", self.central_noise_multiplier, self.central_noise_multiplier >= 0, ">= 0"),
                ("central-target-delta", self.central_target_delta, 0 <= self.central_target_delta < 1, "in [0, 1)"),
            ):
                if not valid:
                    raise ConfigError(f"dp.{key} must be {what} under dp.central={self.central}, got {value}")

    @property
    def ledgered(self) -> bool:
        """Whether the run keeps a privacy ledger: the sites' DP-SGD, central DP, or both."""
        return self.enabled or self.central != "off"


@dataclass
class PrivacyPlan:
    """A site's mechanism for the whole run: fixed at its first round, kept in its state."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    delta: float
    budget_epsilon: float
    clip_norm: float
    accountant: str
    users: int
    history: list[list[float]] = field(default_factory=list)  # (σ, q, steps) per trained round
    release_noise_multiplier: float = 0.0  # σ of the popularity release; 0: the site releases none
    baskets_per_user: int = 1  # at most, per sampled user and step; m of them are each clipped to clip_norm / m
    head_clip_share: float = 0.0  # of clip_norm², kept for the model's head (DPConfig.head_clip_share)
    popularity_release: dict | None = None  # the release (PopularityRelease.to_json), once made: used all run

    @property
    def releases(self) -> int:
        return int(self.popularity_release is not None)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyPlan":
        return cls(**json.loads(text))

    @property
    def total_steps(self) -> int:
        return int(sum(h[2] for h in self.history))

    def epsilon(self, extra_steps: int = 0, *, releases: int | None = None) -> float:
        """ε spent so far (plus ``extra_steps`` more at this plan's σ and q, and ``releases``
        popularity releases in all instead of those made), by one accountant over the run."""
        history: list[list[float]] = []
        for s, q, n in [*self.history, *([[self.noise_multiplier, self.sample_rate, extra_steps]] if extra_steps else [])]:
            if history and history[-1][:2] == [s, q]:
                history[-1][2] += n  # the same mechanism run on: one entry, as Opacus' own step() keeps it
            else:
                history.append([s, q, n])
        releases = self.releases if releases is None else releases
        if releases:
            history.append([self.release_noise_multiplier, 1.0, releases])
        return composed_epsilon(history, delta=self.delta, accountant=self.accountant)

    def record(self, steps: int) -> None:
        if steps:
            self.history.append([self.noise_multiplier, self.sample_rate, steps])


def composed_epsilon(history: list[list[float]], *, delta: float, accountant: str) -> float:
    """ε at δ of Gaussian mechanisms (σ, q, steps) composed by one Opacus accountant."""
    if not history:
        return 0.0
    composer = create_accountant(mechanism=accountant)
    composer.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # PRV takes log(1 - q), -inf at q = 1: handled
        return float(composer.get_epsilon(delta=delta))


def calibrate_noise(epsilon_at, target: float) -> float:
    """The smallest σ (to 0.5 %) whose ε is at most ``target``; ``epsilon_at`` falls as σ grows."""
    low, high = 0.05, 1.0
    while epsilon_at(high) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise ConfigError(f"no noise multiplier up to 1e4 keeps ε within {target:g}; raise the budget or δ")
    while high / low > 1.005:
        middle = math.sqrt(low * high)
        low, high = (middle, high) if epsilon_at(middle) > target else (low, middle)
    return high


def release_noise(dp: DPConfig, *, delta: float) -> float:
    """σ of the popularity release: on its own it costs dp.popularity-share of the budget (0: none)."""
    if not dp.popularity_share:
        return 0.0
    share = dp.popularity_share * dp.target_epsilon
    return calibrate_noise(lambda s: composed_epsilon([[s, 1.0, 1]], delta=delta, accountant=dp.accountant), share)


def plan_privacy(
    dp: DPConfig, *, num_users: int, batch_size: int, local_epochs: int, planned_rounds: int, release: bool = False
) -> PrivacyPlan:
    """Sample rate from the batch size, δ from the site's size, σ calibrated to spend the budget
    over the planned rounds (or as given); with ``release``, the popularity release's σ too, and
    the steps' σ calibrated to spend what the release leaves of the budget."""
    if num_users < 1:
        raise ConfigError("a private site needs at least one user with a training basket")
    q = min(1.0, batch_size / num_users)
    steps_per_round = max(1, local_epochs * math.ceil(1 / q))
    steps = planned_rounds * steps_per_round
    delta = dp.target_delta or 1.0 / (10 * num_users)
    release_sigma = release_noise(dp, delta=delta) if release else 0.0
    if dp.noise_multiplier:
        sigma = dp.noise_multiplier
    elif release_sigma:
        sigma = calibrate_noise(lambda s: composed_epsilon([[s, q, steps], [release_sigma, 1.0, 1]], delta=delta,
                                                      accountant=dp.accountant), dp.target_epsilon)
    else:
        sigma = get_noise_multiplier(
            target_epsilon=dp.target_epsilon,
            target_delta=delta,
            sample_rate=q,
            steps=steps,
            accountant=dp.accountant,
            epsilon_tolerance=0.005,
        )
    return PrivacyPlan(
        noise_multiplier=float(sigma),
        sample_rate=q,
        steps_per_round=steps_per_round,
        delta=delta,
        budget_epsilon=dp.target_epsilon,
        clip_norm=dp.max_grad_norm,
        accountant=dp.accountant,
        users=num_users,
        release_noise_multiplier=release_sigma,
        baskets_per_user=dp.baskets_per_user,
        head_clip_share=dp.head_clip_share,
    )


def _clip_groups(dp_optimizer: DPOptimizer, bounds: torch.Tensor, groups: list[tuple[set[int], float]]) -> None:
    """Clip each row's per-sample gradient on each parameter group to bound·√share (the shares sum to
    1), before the optimizer clips all rows to C (then a no-op) and adds noise σ·C: every row stays
    within its bound, and a user's m rows, each within C / m, stay within C together."""
    for members, share in groups:
        params = [p for p in dp_optimizer.params if id(p) in members and p.grad_sample is not None]
        if not params:
            continue
        norms = torch.stack([p.grad_sample.reshape(len(p.grad_sample), -1).norm(dim=1) for p in params], dim=1).norm(dim=1)
        factor = (bounds * math.sqrt(share) / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad_sample = p.grad_sample * factor.view(-1, *([1] * (p.grad_sample.dim() - 1)))


def frozen_parameters(model: HierModel, frozen: str) -> list[torch.nn.Parameter]:
    """The trainable parameters that dp.frozen keeps out of a DP round."""
    if frozen == "none":
        return []
    if frozen == "projections":
        return model.projection_parameters()
    head = {id(p) for p in model.head_parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in head]


def grad_sample_dtype(precision: str) -> torch.dtype:
    """The dtype of dp.grad-sample-precision on this machine."""
    if precision == "auto":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()  # private in torch: may move
        return torch.bfloat16 if native else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]


def clip_groups(model: HierModel, head_share: float) -> list[tuple[set[int], float]]:
    """The parameter groups of a plan's clipping: the head and the rest, or all values as one."""
    everything = {id(p) for p in model.parameters() if p.requires_grad}
    if not head_share:
        return [(everything, 1.0)]
    head = {id(p) for p in model.head_parameters()}
    return [(head, head_share), (everything - head, 1.0 - head_share)]


def private_round(
    model: HierModel,
    builder: FeatureBuilder,
    *,
    plan: PrivacyPlan,
    optimizer: torch.optim.Optimizer,
    targets: dict[int, list[int]],
    negatives: str,
    random_negatives: int,
    rng: np.random.Generator,
    public_gradient=None,
    frozen: str = "none",
    precision: str = "float32",
) -> tuple[list[float], int]:
    """plan.steps_per_round DP-SGD steps; returns the losses of non-empty steps and the steps taken.

    ``frozen`` (dp.frozen) names values kept as they are: no hooks, no gradient, no noise on them.
    ``precision`` (dp.grad-sample-precision) is that of the item tower's per-user gradients; the default
    here, float32, is exact (tests rely on it), DPConfig's auto is the product's default.

    ``public_gradient()`` may add a data-free term to the noised gradients before each update (FedProx's
    proximal term): hooks only see per-sample terms, so a penalty added to the loss would be dropped.
    """
    users = np.fromiter(targets, dtype=np.int64)
    kept = frozen_parameters(model, frozen)
    for p in kept:  # before the hooks: Opacus and the DP optimizer then see the rest only
        p.requires_grad_(False)
    module = None
    losses = []
    tower = model.scorer.item_tower
    previous_dtype = tower.grad_sample_dtype
    try:
        tower.grad_sample_dtype = grad_sample_dtype(precision)
        groups = clip_groups(model, plan.head_clip_share)
        # the hooks see the summed loss, so each per-sample gradient is its user's own and Opacus need not
        # rescale every backprop by the batch size; the optimizer still averages (divides by the expected batch)
        module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.clip_norm,
            expected_batch_size=max(1, round(plan.sample_rate * len(users))),
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(secrets.randbits(63)),  # noise nobody else can replay
        )
        for _ in range(plan.steps_per_round):
            module.train()
            dp_optimizer.zero_grad(set_to_none=True)
            sampled = users[rng.random(len(users)) < plan.sample_rate]  # Poisson sampling of users
            if len(sampled):
                chosen = [rng.choice(targets[int(u)], size=min(plan.baskets_per_user, len(targets[int(u)])), replace=False)
                          for u in sampled]
                examples = [Example(int(u), int(t)) for u, baskets in zip(sampled, chosen) for t in baskets]
                history, candidates = builder.training_batch(
                    examples, rng=rng, negatives=negatives, random_negatives=random_negatives, in_batch_negatives=0
                )
                out = module(history, candidates)
                with warnings.catch_warnings():  # the cached encodings need no gradient: torch warns each step
                    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                    out.per_user_loss.sum().backward()
                losses.append(float(out.loss.detach()))
                if plan.baskets_per_user > 1 or len(groups) > 1:
                    bounds = np.repeat([plan.clip_norm / len(b) for b in chosen], [len(b) for b in chosen])
                    _clip_groups(dp_optimizer, torch.as_tensor(bounds, dtype=torch.float32), groups)
            else:  # nobody sampled: the step still adds noise, as the accountant assumes
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros((0, *p.shape))
            if dp_optimizer.pre_step():  # clip per user, add noise, average
                if public_gradient is not None:
                    public_gradient()
                dp_optimizer.original_optimizer.step()
    finally:
        tower.grad_sample_dtype = previous_dtype
        if module is not None:
            module.remove_hooks()  # the model goes back to plain training and evaluation
        for p in kept:
            p.requires_grad_(True)
        for p in model.parameters():
            p.grad_sample = None
    return losses, plan.steps_per_round
