"""Centralized training: one sampled target basket per user per epoch, early stopping on validation."""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hiermodel.data.split import Example, train_targets_by_user
from hiermodel.evaluation import evaluate_ranker
from hiermodel.features import FeatureBuilder
from hiermodel.model import HierModel
from hiermodel.ranker import HierRanker

EARLY_STOPPING_METRIC = "ndcg@10"


@dataclass
class TrainConfig:
    """Optimisation settings (run config group `train.*`)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-5
    # the best on Online Retail validation (see BENCHMARKS.md); user-level DP needs uniform + sampled
    targets: str = "all"  # which training baskets a user contributes per epoch: uniform | latest | all
    negatives: str = "catalogue"  # catalogue (full softmax) | sampled (history + random + in-batch)
    random_negatives: int = 100
    in_batch_negatives: int = 128
    max_positives: int = 50
    patience: int = 3
    seed: int = 0
    eval_batch_size: int = 128


TARGET_MODES = ("uniform", "latest", "all")


def round_lr(lr: float, server_round: int, rounds: int, final: float) -> float:
    """The learning rate of a federated round: a cosine from ``lr`` (round 1) to ``final × lr``
    (round ``rounds``, and any round after it)."""
    if rounds <= 1 or final == 1.0:
        return lr
    progress = min(max(server_round - 1, 0) / (rounds - 1), 1.0)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_targets(targets_by_user: dict[int, list[int]], rng: np.random.Generator, mode: str = "uniform") -> list[Example]:
    """The epoch's examples in random order: per user one uniformly drawn target, the latest, or all.

    One target per user keeps the user as the training record (as user-level DP needs); "latest"
    is closest to the evaluation targets, whose histories are the longest.
    """
    if mode not in TARGET_MODES:
        raise ValueError(f"unknown train.targets {mode!r}; valid: {', '.join(TARGET_MODES)}")
    if mode == "all":
        examples = [Example(u, t) for u, ts in targets_by_user.items() for t in ts]
        return [examples[i] for i in rng.permutation(len(examples))]
    users = rng.permutation(np.fromiter(targets_by_user, dtype=np.int64))
    pick = (lambda ts: ts[-1]) if mode == "latest" else (lambda ts: int(rng.choice(ts)))
    return [Example(int(u), int(pick(targets_by_user[int(u)]))) for u in users]


Regularizer = Callable[[], torch.Tensor]


def train_step(model: HierModel, optimizer: torch.optim.Optimizer, history, candidates, regularizer: Regularizer | None = None) -> float:
    """One gradient step on one batch (plus an optional penalty, e.g. FedProx's); returns the batch loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(history, candidates)
    loss = out.loss if regularizer is None else out.loss + regularizer()
    loss.backward()
    optimizer.step()
    return float(out.loss.detach())


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def train_epoch(
    model: HierModel,
    builder: FeatureBuilder,
    optimizer: torch.optim.Optimizer,
    *,
    examples: Sequence[Example],
    config: TrainConfig,
    rng: np.random.Generator,
    regularizer: Regularizer | None = None,
) -> float:
    """One pass over ``examples`` in batches; returns the mean batch loss."""
    losses = []
    for start in range(0, len(examples), config.batch_size):
        history, candidates = builder.training_batch(
            examples[start : start + config.batch_size],
            rng=rng,
            negatives=config.negatives,
            random_negatives=config.random_negatives,
            in_batch_negatives=config.in_batch_negatives,
            max_positives=config.max_positives,
        )
        losses.append(train_step(model, optimizer, history, candidates, regularizer))
    return float(np.mean(losses)) if losses else float("nan")


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # per epoch: loss, validation metrics, λ, seconds
    best_epoch: int
    best_validation: dict[str, float]


def fit(
    model: HierModel,
    builder: FeatureBuilder,
    config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train until validation NDCG@10 stops improving for ``patience`` epochs; keeps the best weights."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    targets = train_targets_by_user(builder.dataset)
    if not targets:
        raise ValueError("no training examples: every user needs at least two baskets")
    optimizer = make_optimizer(model, config)
    ranker = HierRanker(model, builder, batch_size=config.eval_batch_size)
    best_state, best_metrics, best_epoch, stale = None, None, 0, 0
    log: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        loss = train_epoch(model, builder, optimizer, examples=sample_targets(targets, rng, config.targets), config=config, rng=rng)
        trained = time.perf_counter()
        val = evaluate_ranker(ranker, builder.dataset, split="validation", batch_size=config.eval_batch_size)
        row = {"epoch": epoch, "loss": loss, **{f"val_{k}": v for k, v in val.items()},
               **lambda_metrics(model), "train_seconds": trained - started,
               "eval_seconds": time.perf_counter() - trained}
        log.append(row)
        if on_epoch:
            on_epoch(row)
        if best_metrics is None or val[EARLY_STOPPING_METRIC] > best_metrics[EARLY_STOPPING_METRIC]:
            best_state, best_metrics, best_epoch, stale = copy.deepcopy(model.state_dict()), val, epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    return TrainResult(history=log, best_epoch=best_epoch, best_validation=best_metrics)


def lambda_metrics(model: HierModel) -> dict[str, float]:
    """λ per level as scalar metrics (lambda_word, lambda_sentence, …)."""
    with torch.no_grad():
        lam = model.combiner.lambdas(1)[0].tolist()
    return {f"lambda_{name}": float(v) for name, v in zip(model.level_names, lam)}


def lambda_grid(num_levels: int, step: float = 0.25) -> list[list[float]]:
    """Points of the λ simplex with the given step (every weight a multiple of step)."""
    n = round(1 / step)
    return [
        [c / n for c in combo]
        for combo in itertools.product(range(n + 1), repeat=num_levels)
        if sum(combo) == n
    ]


def choose_lambda_on_validation(model: HierModel, builder: FeatureBuilder, *, step: float = 0.25, batch_size: int = 128) -> tuple[list[float], dict[str, float]]:
    """Fix λ at the simplex grid point with the best validation NDCG@10; returns it and its metrics."""
    if model.combiner.mode != "validation":
        raise ValueError("choosing λ on validation needs model.combiner = validation")
    ranker = HierRanker(model, builder, batch_size=batch_size)
    best: tuple[float, list[float], dict[str, float]] | None = None
    for lam in lambda_grid(model.config.num_levels, step):
        model.combiner.set_fixed(lam)
        val = evaluate_ranker(ranker, builder.dataset, split="validation", batch_size=batch_size)
        if best is None or val[EARLY_STOPPING_METRIC] > best[0]:
            best = (val[EARLY_STOPPING_METRIC], lam, val)
    model.combiner.set_fixed(best[1])
    return best[1], best[2]
