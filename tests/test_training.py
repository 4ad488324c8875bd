"""Learning: on synthetic data the trained model clearly beats global popularity."""

from __future__ import annotations

import numpy as np
import pytest

from hiermodel.data.synthetic import SyntheticConfig, generate_synthetic
from hiermodel.data.split import train_targets_by_user
from hiermodel.evaluation import evaluate_ranker
from hiermodel.baselines import build_baseline
from hiermodel.model import HierModelConfig
from hiermodel.pipeline import new_model
from hiermodel.ranker import HierRanker
from hiermodel.training import TrainConfig, choose_lambda_on_validation, fit, lambda_grid, round_lr, sample_targets
from tests.helpers import prepared


@pytest.fixture(scope="module")
def synthetic(tiny_backbone: str, tmp_path_factory):
    return prepared(generate_synthetic(SyntheticConfig(num_users=150, seed=3)), backbone=tiny_backbone,
                    cache_root=tmp_path_factory.mktemp("cache"), max_history_items=24, max_baskets=6, max_basket_items=8)


@pytest.mark.parametrize("negatives", ["sampled", "catalogue"])
def test_trained_model_clearly_beats_global_popularity(synthetic, negatives: str) -> None:
    dataset, config, builder = synthetic
    model = new_model(config)
    result = fit(model, builder, TrainConfig(epochs=6, batch_size=32, lr=5e-3, patience=6, negatives=negatives))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    trained = evaluate_ranker(HierRanker(model, builder), dataset, split="test")
    gpop = evaluate_ranker(build_baseline("gpop", dataset=dataset), dataset, split="test")
    assert trained["ndcg@10"] > 1.5 * gpop["ndcg@10"]
    assert trained["recall@20"] > gpop["recall@20"] + 0.1


def test_early_stopping_keeps_the_best_epoch(synthetic) -> None:
    _, config, builder = synthetic
    result = fit(new_model(config), builder, TrainConfig(epochs=4, batch_size=64, lr=0.5, patience=1))
    best = max(row["val_ndcg@10"] for row in result.history)
    assert result.best_validation["ndcg@10"] == pytest.approx(best)
    assert len(result.history) <= 4


def test_lambda_chosen_on_validation_is_a_grid_point(synthetic) -> None:
    _, config, builder = synthetic
    model = new_model(HierModelConfig(**{**config.__dict__, "combiner": "validation"}))
    fit(model, builder, TrainConfig(epochs=1, batch_size=64))
    lam, metrics = choose_lambda_on_validation(model, builder, step=0.5)
    assert lam in lambda_grid(3, 0.5)
    assert model.combiner.fixed_lambda.tolist() == pytest.approx(lam)
    assert "ndcg@10" in metrics
    learned = new_model(config)
    with pytest.raises(ValueError, match="validation"):
        choose_lambda_on_validation(learned, builder)


def test_target_sampling_modes(synthetic) -> None:
    dataset, _, _ = synthetic
    targets = train_targets_by_user(dataset)
    rng = np.random.default_rng(0)
    one = sample_targets(targets, rng)
    assert len(one) == len(targets) and len({e.user for e in one}) == len(targets)
    latest = sample_targets(targets, rng, "latest")
    assert all(e.target == targets[e.user][-1] for e in latest)
    assert len(sample_targets(targets, rng, "all")) == sum(len(t) for t in targets.values())
    with pytest.raises(ValueError, match="train.targets"):
        sample_targets(targets, rng, "nope")
    assert len(lambda_grid(3, 0.25)) == 15


def test_the_federated_learning_rate_falls_by_a_cosine_to_its_final_share() -> None:
    rates = [round_lr(0.01, r, 5, 0.1) for r in range(1, 8)]
    assert rates[0] == 0.01 and rates[4] == pytest.approx(0.001) and rates[5:] == [pytest.approx(0.001)] * 2
    assert all(a > b for a, b in zip(rates[:5], rates[1:5]))
    assert round_lr(0.01, 3, 5, 0.5) == pytest.approx(0.0075)  # half-way: the mean of the ends
    assert [round_lr(0.01, r, 5, 1.0) for r in (1, 5)] == [0.01, 0.01] and round_lr(0.01, 1, 1, 0.1) == 0.01
