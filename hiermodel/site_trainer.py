"""One site's local work in a federated round, free of Flower: load the global trainable state,
train the configured local epochs on the site's own users, evaluate, and hand back only the
trainable state and scalar metrics."""

from __future__ import annotations

import secrets
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from hiermodel.data.dataset import Dataset
from hiermodel.data.split import train_targets_by_user
from hiermodel.evaluation import evaluate_ranker
from hiermodel.model import HierModel, HierModelConfig
from hiermodel.pipeline import prepare
from hiermodel.private_popularity import PopularityRelease, release_popularity
from hiermodel.privacy import ACCOUNTANT_CODES, DPConfig, PrivacyPlan, grad_sample_dtype, plan_privacy, private_round
from hiermodel.ranker import HierRanker
from hiermodel.training import TrainConfig, lambda_metrics, make_optimizer, sample_targets, train_epoch

LAMBDA_KEY = "combiner.logits.weight"


def privacy_metrics(plan: PrivacyPlan, *, steps: int) -> dict[str, float]:
    """What the privacy ledger records for a site's round (numbers only)."""
    return {
        "dp-noise-multiplier": plan.noise_multiplier,
        "dp-sample-rate": plan.sample_rate,
        "dp-steps": steps,
        "dp-total-steps": plan.total_steps,
        "dp-clip-norm": plan.clip_norm,
        "dp-delta": plan.delta,
        "dp-epsilon": plan.epsilon(),
        "dp-budget": plan.budget_epsilon,
        "dp-accountant": ACCOUNTANT_CODES[plan.accountant],
        "dp-users": plan.users,
        "dp-release-noise-multiplier": plan.release_noise_multiplier,
        "dp-releases": plan.releases,  # popularity releases so far (the run's one, once made)
    }


@dataclass
class LocalResult:
    state: dict[str, np.ndarray]
    metrics: dict[str, float]


class SiteTrainer:
    """A site's data, feature builder and model, kept for the whole run (built once per process)."""

    def __init__(self, dataset: Dataset, model_config: HierModelConfig, *, private: bool = False) -> None:
        """A private site never computes plain popularity: its popularity features hold zeros until
        the privacy plan's DP release (use_release)."""
        self.dataset = dataset
        self.private = private
        self.config, self.builder = prepare(dataset, model_config, progress=False,
                                            popularity=PopularityRelease.empty(dataset.num_items) if private else None)
        self.model = HierModel(self.config)
        self.targets = train_targets_by_user(dataset)

    def use_release(self, plan: PrivacyPlan | None) -> None:
        """Feed this run's popularity release to a private site's features, or none: a release of
        another run (this process may serve several) or of a round that never completed must not stay."""
        if not self.private:
            return
        if plan is not None and plan.popularity_release is not None:
            self.builder.set_popularity(PopularityRelease.from_json(plan.popularity_release))
        else:
            self.builder.set_popularity(PopularityRelease.empty(self.dataset.num_items))

    def train(
        self,
        state: dict[str, np.ndarray],
        *,
        train_config: TrainConfig,
        local_epochs: int,
        server_round: int,
        personal_lambda: np.ndarray | None = None,
        proximal_mu: float = 0.0,
        privacy: PrivacyPlan | None = None,
        dp_config: DPConfig | None = None,
    ) -> LocalResult:
        """Local epochs from the global state; the reply holds the new state and scalar metrics.

        proximal_mu > 0 adds FedProx's μ/2 ‖w − w_global‖². With a privacy plan the round is DP-SGD,
        and a round that would take the site past its budget is declined: the reply then carries the
        received state unchanged and num-examples 0, so the average leaves it out.
        """
        started = time.perf_counter()
        if privacy is not None and not self.private:  # its features would hold plain popularity
            raise ValueError("a private round needs a site built with SiteTrainer(..., private=True)")
        self.use_release(privacy)
        self.model.load_trainable_state(state)
        if personal_lambda is not None:
            self._set_lambda(personal_lambda)
        # seeded per site and round for reproducible plain training; a private round draws its
        # sampling and noise from OS randomness (a seed known to the server would let it undo the noise)
        seed = train_config.seed * 100_003 + server_round * 7_919 + zlib.crc32(self.dataset.name.encode())
        torch.manual_seed(seed)
        rng = np.random.default_rng(secrets.randbits(128) if privacy is not None else seed)
        if privacy is not None and privacy.epsilon(privacy.steps_per_round) > privacy.budget_epsilon:
            return LocalResult(state, {"num-examples": 0, "dp-declined": 1, **privacy_metrics(privacy, steps=0)})
        optimizer = make_optimizer(self.model, train_config)
        anchor = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        losses, examples = [], 0
        for _ in range(local_epochs if self.targets and privacy is None else 0):
            epoch = sample_targets(self.targets, rng, train_config.targets)
            regularizer = self._proximal_penalty(proximal_mu, anchor) if proximal_mu > 0 else None
            losses.append(train_epoch(self.model, self.builder, optimizer, examples=epoch, config=train_config,
                                      rng=rng, regularizer=regularizer))
            examples += len(epoch)
        extra: dict[str, float] = {}
        if privacy is not None:
            dp_config = dp_config or DPConfig()
            step_losses, steps = private_round(
                self.model, self.builder, plan=privacy, optimizer=optimizer, targets=self.targets,
                negatives=dp_config.negatives, random_negatives=dp_config.random_negatives, rng=rng,
                public_gradient=self._proximal_gradient(proximal_mu, anchor) if proximal_mu > 0 else None,
                frozen=dp_config.frozen, precision=dp_config.grad_sample_precision,
            )
            privacy.record(steps)
            losses, examples = step_losses, int(steps)
            # the precision dp.grad-sample-precision resolved to here (auto differs between CPUs), for the record
            bits = torch.finfo(grad_sample_dtype(dp_config.grad_sample_precision)).bits
            extra = {"dp-declined": 0, **privacy_metrics(privacy, steps=steps), "dp-grad-sample-bits": bits}
        metrics = {
            "num-examples": len(self.targets),  # users: the weight of this site in the average
            "train-examples": examples,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "train-seconds": time.perf_counter() - started,
            **{k.replace("_", "-"): v for k, v in lambda_metrics(self.model).items()},
            **extra,
        }
        return LocalResult(self.model.trainable_state(), metrics)

    def evaluate(self, state: dict[str, np.ndarray], *, split: str, personal_lambda: np.ndarray | None = None,
                 privacy: PrivacyPlan | None = None) -> dict[str, float]:
        """Full-catalogue metrics of ``state`` on this site's own users (validation or test)."""
        self.use_release(privacy)
        self.model.load_trainable_state(state)
        if personal_lambda is not None:
            self._set_lambda(personal_lambda)
        result = evaluate_ranker(HierRanker(self.model, self.builder), self.dataset, split=split)
        return {"num-examples": int(result.pop("users")), **result}

    def _proximal_penalty(self, mu: float, anchor: dict[str, torch.Tensor]):
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}

        def penalty() -> torch.Tensor:
            return 0.5 * mu * sum(((params[n] - anchor[n]) ** 2).sum() for n in params)

        return penalty

    def _proximal_gradient(self, mu: float, anchor: dict[str, torch.Tensor]):
        """The proximal term's gradient μ (w − w_global), added to the already noised gradient."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}

        def add() -> None:
            with torch.no_grad():
                for n, p in params.items():
                    if p.grad is not None:  # None: kept out of the round (dp.frozen), still at w_global
                        p.grad.add_(mu * (p - anchor[n]))

        return add

    def privacy_plan(self, dp: DPConfig, *, batch_size: int, local_epochs: int, planned_rounds: int) -> PrivacyPlan | None:
        """The site's DP mechanism; None for a site with no user to train on (it has nothing to protect or send)."""
        if not self.targets:
            return None
        release = self.config.use_popularity and dp.popularity_share > 0 and dp.popularity_weeks > 0

        def planned(with_release: bool) -> PrivacyPlan:
            return plan_privacy(dp, num_users=len(self.targets), batch_size=batch_size, local_epochs=local_epochs,
                                planned_rounds=planned_rounds, release=with_release)

        plan = planned(release)
        # made now, once for the run (the plan's ε from here on includes it); not by a site whose
        # budget cannot pay for it and a first round, as it would spend ε and then decline
        if release and plan.epsilon(plan.steps_per_round, releases=1) <= plan.budget_epsilon:
            # the users the plan counts (δ is set from them), on the run's public week grid
            plan.popularity_release = release_popularity(
                self.dataset, plan.release_noise_multiplier, start=dp.popularity_start, weeks=dp.popularity_weeks,
                users=sorted(self.targets),
            ).to_json()
        elif release:  # no room for it (a fixed σ spends too much): the plan says there is no release
            plan = planned(False)
        return plan

    def current_lambda(self) -> np.ndarray:
        return self.model.trainable_state()[LAMBDA_KEY]

    def _set_lambda(self, value: np.ndarray) -> None:
        with torch.no_grad():
            self.model.combiner.logits.weight.copy_(torch.as_tensor(value))
