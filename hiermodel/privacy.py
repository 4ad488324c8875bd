"""User-level DP-SGD for one site (Opacus): the budget, the accountant that lives for the whole run,
and one private round of local training.

The unit of privacy is a user of the site. Each step samples users by Poisson sampling (rate q);
a sampled user contributes one target basket, scored against candidates built from that user's
own history and public catalogue items only (never other users' baskets: no in-batch negatives),
so one user's data touches one per-sample gradient,
which is clipped to the clip norm before Gaussian noise is added.
"""

from __future__ import annotations

import json
import math
import secrets
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

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown dp.accountant {self.accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
        if self.enabled and self.target_epsilon <= 0:
            raise ConfigError(f"dp.target-epsilon must be positive, got {self.target_epsilon}")
        if self.max_grad_norm <= 0 or self.noise_multiplier < 0 or not 0 <= self.target_delta < 1:
            raise ConfigError("dp.max-grad-norm must be > 0, dp.noise-multiplier >= 0, 0 <= dp.target-delta < 1")


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

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyPlan":
        return cls(**json.loads(text))

    @property
    def total_steps(self) -> int:
        return int(sum(h[2] for h in self.history))

    def epsilon(self, extra_steps: int = 0) -> float:
        """ε spent so far (plus ``extra_steps`` more at this plan's σ and q), by one accountant over the run."""
        history: list[list[float]] = []
        for s, q, n in [*self.history, *([[self.noise_multiplier, self.sample_rate, extra_steps]] if extra_steps else [])]:
            if history and history[-1][:2] == [s, q]:
                history[-1][2] += n  # the same mechanism run on: one entry, as Opacus' own step() keeps it
            else:
                history.append([s, q, n])
        if not history:
            return 0.0
        accountant = create_accountant(mechanism=self.accountant)
        accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
        return float(accountant.get_epsilon(delta=self.delta))

    def record(self, steps: int) -> None:
        if steps:
            self.history.append([self.noise_multiplier, self.sample_rate, steps])


def plan_privacy(dp: DPConfig, *, num_users: int, batch_size: int, local_epochs: int, planned_rounds: int) -> PrivacyPlan:
    """Sample rate from the batch size, δ from the site's size, σ calibrated to spend the budget
    over the planned rounds (or as given)."""
    if num_users < 1:
        raise ConfigError("a private site needs at least one user with a training basket")
    q = min(1.0, batch_size / num_users)
    steps_per_round = max(1, local_epochs * math.ceil(1 / q))
    delta = dp.target_delta or 1.0 / (10 * num_users)
    sigma = dp.noise_multiplier or get_noise_multiplier(
        target_epsilon=dp.target_epsilon,
        target_delta=delta,
        sample_rate=q,
        steps=planned_rounds * steps_per_round,
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
    )


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
) -> tuple[list[float], int]:
    """plan.steps_per_round DP-SGD steps; returns the losses of non-empty steps and the steps taken.

    ``public_gradient()`` may add a data-free term to the noised gradients before each update (FedProx's
    proximal term): hooks only see per-sample terms, so a penalty added to the loss would be dropped.
    """
    users = np.fromiter(targets, dtype=np.int64)
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.clip_norm,
        expected_batch_size=max(1, round(plan.sample_rate * len(users))),
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(secrets.randbits(63)),  # noise nobody else can replay
    )
    losses = []
    try:
        for _ in range(plan.steps_per_round):
            module.train()
            dp_optimizer.zero_grad(set_to_none=True)
            sampled = users[rng.random(len(users)) < plan.sample_rate]  # Poisson sampling of users
            if len(sampled):
                examples = [Example(int(u), int(rng.choice(targets[int(u)]))) for u in sampled]
                history, candidates = builder.training_batch(
                    examples, rng=rng, negatives=negatives, random_negatives=random_negatives, in_batch_negatives=0
                )
                out = module(history, candidates)
                out.loss.backward()
                losses.append(float(out.loss.detach()))
            else:  # nobody sampled: the step still adds noise, as the accountant assumes
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros((0, *p.shape))
            if dp_optimizer.pre_step():  # clip per user, add noise, average
                if public_gradient is not None:
                    public_gradient()
                dp_optimizer.original_optimizer.step()
    finally:
        module.remove_hooks()  # the model goes back to plain training and evaluation
        for p in model.parameters():
            p.grad_sample = None
    return losses, plan.steps_per_round
