"""User-level DP-SGD at a site: composition over rounds, budget enforcement, noise and clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant

from hiermodel.errors import ConfigError
from hiermodel.model import HierModelConfig
from hiermodel.privacy import DPConfig, PrivacyPlan, grad_sample_dtype, plan_privacy, private_round
from hiermodel.site_trainer import SiteTrainer
from hiermodel.training import TrainConfig
from tests.helpers import toy_dataset


@pytest.fixture(scope="module")
def site(tiny_backbone: str, tmp_path_factory, isolated_cache_root=None) -> SiteTrainer:
    config = HierModelConfig(backbone=tiny_backbone, max_tokens=8, dim=8, max_history_items=8, max_baskets=3,
                             max_basket_items=4, use_popularity=False)
    return SiteTrainer(toy_dataset(num_users=30), config, private=True)


def _noise_norm(noise: np.ndarray, *, sigma: float, clip: float) -> bool:
    """Whether ``noise`` has the norm of N(0, (σ·C)²) noise on each of its values: σ·C·√n, within 6
    standard deviations of that norm (its relative spread is 1 / √(2n)); a wrong scale (σ·C / k) is far out."""
    n = noise.size
    return abs(np.linalg.norm(noise) / (sigma * clip * np.sqrt(n)) - 1) < 6 / np.sqrt(2 * n)


def _plan(**kw) -> PrivacyPlan:
    base = dict(noise_multiplier=1.1, sample_rate=0.1, steps_per_round=25, delta=1e-4, budget_epsilon=8.0,
                clip_norm=1.0, accountant="prv", users=100)
    return PrivacyPlan(**{**base, **kw})


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_composed_round_by_round_equals_one_accountant_over_all_steps(accountant: str) -> None:
    plan = _plan(accountant=accountant)
    reference = create_accountant(mechanism=accountant)
    for _ in range(4):
        plan.record(plan.steps_per_round)
        for _ in range(plan.steps_per_round):
            reference.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert plan.total_steps == 100
    assert plan.epsilon() == pytest.approx(reference.get_epsilon(delta=plan.delta), rel=1e-3)
    # the state survives a round trip through the site's context.state
    assert PrivacyPlan.from_json(plan.to_json()).epsilon() == pytest.approx(plan.epsilon())


def test_calibrated_noise_spends_the_budget_over_the_planned_rounds() -> None:
    dp = DPConfig(target_epsilon=2.0)
    plan = plan_privacy(dp, num_users=500, batch_size=50, local_epochs=1, planned_rounds=5)
    assert plan.sample_rate == pytest.approx(0.1) and plan.steps_per_round == 10
    assert plan.delta == pytest.approx(1 / 5000)  # 1 / (10 × users) by default
    assert 1.9 < plan.epsilon(5 * plan.steps_per_round) <= 2.0
    with pytest.raises(ConfigError, match="accountant"):
        DPConfig(accountant="moments")


def test_a_site_with_a_tiny_budget_declines_and_spends_nothing_beyond_it(site: SiteTrainer) -> None:
    state = site.model.trainable_state()
    plan = site.privacy_plan(DPConfig(target_epsilon=3.0, noise_multiplier=1.5), batch_size=10, local_epochs=1,
                             planned_rounds=1)
    rounds = []
    for r in range(1, 6):
        result = site.train(state, train_config=TrainConfig(batch_size=10), local_epochs=1, server_round=r, privacy=plan)
        rounds.append(result.metrics["dp-declined"])
        assert plan.epsilon() <= plan.budget_epsilon
        if result.metrics["dp-declined"]:
            assert result.metrics["num-examples"] == 0
            assert all(np.array_equal(result.state[k], state[k]) for k in state)  # nothing trained
        else:  # the precision auto resolved to on this CPU, in the site's metrics
            assert result.metrics["dp-grad-sample-bits"] == torch.finfo(grad_sample_dtype("auto")).bits
        state = result.state
    assert rounds[0] == 0 and rounds[-1] == 1  # trained while the budget allowed, then declined
    spent = plan.total_steps
    site.train(state, train_config=TrainConfig(batch_size=10), local_epochs=1, server_round=9, privacy=plan)
    assert plan.total_steps == spent


@pytest.mark.parametrize("negatives, precision", [("catalogue", "float32"), ("sampled", "float32"), ("catalogue", "bfloat16")])
def test_noise_changes_the_update_and_per_user_gradients_are_clipped(site: SiteTrainer, negatives: str,
                                                                    precision: str) -> None:
    """At either dp.grad-sample-precision, the per-user gradients that are clipped are the ones summed."""
    start = site.model.trainable_state()
    targets = site.targets

    def update(sigma: float, clip: float) -> np.ndarray:
        site.model.load_trainable_state(start)
        plan = _plan(noise_multiplier=sigma, sample_rate=1.0, steps_per_round=1, clip_norm=clip, users=len(targets))
        optimizer = torch.optim.SGD([p for p in site.model.parameters() if p.requires_grad], lr=1.0)
        torch.manual_seed(0)
        private_round(site.model, site.builder, plan=plan, optimizer=optimizer, targets=targets, negatives=negatives,
                      random_negatives=5, rng=np.random.default_rng(0), precision=precision)
        assert site.model.scorer.item_tower.grad_sample_dtype is None  # as it was before the round
        after = site.model.trainable_state()
        return np.concatenate([(after[k] - start[k]).ravel() for k in start])

    clipped = update(0.0, 1e-3)
    # every user sampled (q = 1): the step is the mean of per-user gradients, each clipped to 1e-3
    assert 0 < np.linalg.norm(clipped) <= 1e-3 * (1 + 1e-4)
    unclipped = update(0.0, 1e6)
    assert np.linalg.norm(unclipped) > 10 * np.linalg.norm(clipped)
    noisy = update(1.0, 1e-3)
    assert np.linalg.norm(noisy - clipped) > 1e-3  # σ · C / B noise per coordinate, many coordinates
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in site.model.parameters())


@pytest.mark.parametrize("baskets, head_share", [(1, 0.0), (2, 0.25)])
def test_a_noiseless_unclipped_round_steps_by_the_mean_of_the_users_gradients(site: SiteTrainer, baskets: int,
                                                                               head_share: float) -> None:
    """σ = 0, every user sampled, a clip norm nothing reaches: one SGD step of lr 1 is minus the sum of
    every user's gradient over the expected batch (the users), whatever the per-sample bookkeeping."""
    from hiermodel.data.split import Example

    targets = {u: ts[:baskets] for u, ts in site.targets.items() if len(ts) >= baskets}  # each user's all chosen
    start = site.model.trainable_state()
    plan = _plan(noise_multiplier=0.0, sample_rate=1.0, steps_per_round=1, clip_norm=1e6, users=len(targets),
                 baskets_per_user=baskets, head_clip_share=head_share)
    optimizer = torch.optim.SGD([p for p in site.model.parameters() if p.requires_grad], lr=1.0)
    private_round(site.model, site.builder, plan=plan, optimizer=optimizer, targets=targets, negatives="catalogue",
                  random_negatives=0, rng=np.random.default_rng(0))
    after = site.model.trainable_state()
    site.model.load_trainable_state(start)
    examples = [Example(u, t) for u, ts in targets.items() for t in ts]
    history, candidates = site.builder.training_batch(examples, rng=np.random.default_rng(0), negatives="catalogue")
    site.model.zero_grad()
    (site.model(history, candidates).per_user_loss.sum() / len(targets)).backward()
    for name, p in site.model.named_parameters():
        if p.requires_grad:
            assert np.allclose(after[name] - start[name], -p.grad.numpy(), atol=1e-6, rtol=1e-4), name
    site.model.zero_grad()


@pytest.mark.parametrize("frozen", ["projections", "all-but-head"])
def test_frozen_values_get_neither_gradient_nor_noise_and_train_again_after_the_round(site: SiteTrainer, frozen: str) -> None:
    from hiermodel.privacy import frozen_parameters

    model = site.model
    start = model.trainable_state()
    kept = {n for n, p in model.named_parameters() if any(p is q for q in frozen_parameters(model, frozen))}
    head = {n for n, p in model.named_parameters() if any(p is q for q in model.head_parameters())}
    assert kept and (kept.isdisjoint(head) if frozen == "all-but-head" else "scorer.item_tower.weight" in kept)
    plan = _plan(noise_multiplier=1.0, sample_rate=1.0, steps_per_round=2, users=len(site.targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    private_round(model, site.builder, plan=plan, optimizer=optimizer, targets=site.targets, negatives="catalogue",
                  random_negatives=0, rng=np.random.default_rng(0), frozen=frozen)
    after = model.trainable_state()
    assert set(after) == set(start)  # the whole trainable state still travels
    for name in start:
        assert np.array_equal(after[name], start[name]) == (name in kept), name
    assert all(p.requires_grad for p in model.parameters()) and not any(p.grad_sample is not None for p in model.parameters())
    model.load_trainable_state(start)


def test_dp_grad_sample_precision_is_checked() -> None:
    with pytest.raises(ConfigError, match="unknown dp.grad-sample-precision 'half'"):
        DPConfig(grad_sample_precision="half")
    assert grad_sample_dtype("float32") == torch.float32 and grad_sample_dtype("bfloat16") == torch.bfloat16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    assert grad_sample_dtype("auto") == (torch.bfloat16 if native else torch.float32)


def test_dp_frozen_is_checked() -> None:
    with pytest.raises(ConfigError, match="unknown dp.frozen"):
        DPConfig(frozen="towers")
    with pytest.raises(ConfigError, match="trains the head alone"):
        DPConfig(frozen="all-but-head", head_clip_share=0.5)
    with pytest.raises(ConfigError, match="applies to DP rounds only"):
        DPConfig(enabled=False, frozen="projections")


def test_a_users_several_baskets_together_stay_within_the_clip_norm(site: SiteTrainer) -> None:
    user, baskets = max(site.targets.items(), key=lambda kv: len(kv[1]))
    assert len(baskets) >= 3
    start = site.model.trainable_state()

    def update(k: int, sigma: float = 0.0) -> np.ndarray:
        site.model.load_trainable_state(start)
        plan = _plan(noise_multiplier=sigma, sample_rate=1.0, steps_per_round=1, clip_norm=1e-3, users=1,
                     baskets_per_user=k)
        optimizer = torch.optim.SGD([p for p in site.model.parameters() if p.requires_grad], lr=1.0)
        private_round(site.model, site.builder, plan=plan, optimizer=optimizer, targets={user: baskets},
                      negatives="catalogue", random_negatives=5, rng=np.random.default_rng(0))
        after = site.model.trainable_state()
        return np.concatenate([(after[n] - start[n]).ravel() for n in start])

    one, three = update(1), update(3)
    # the only user, sampled: the step is their whole contribution, one basket or three of them
    assert 0 < np.linalg.norm(one) <= 1e-3 * (1 + 1e-4)
    assert 0 < np.linalg.norm(three) <= 1e-3 * (1 + 1e-4) and not np.allclose(one, three)
    # the noise is σ·C whatever k: a Gaussian vector of norm about σ·C·√n (n values, one user, lr 1)
    for k in (1, 3):
        assert _noise_norm(update(k, sigma=1.0) - update(k), sigma=1.0, clip=1e-3)


def test_the_heads_share_of_the_clip_norm_bounds_each_group_and_keeps_the_total(site: SiteTrainer) -> None:
    user, baskets = next(iter(site.targets.items()))
    start = site.model.trainable_state()
    head = {n for n, p in site.model.named_parameters() if any(p is h for h in site.model.head_parameters())}
    assert head and any(n.startswith("scorer.wide") for n in head) and not any("item_tower" in n for n in head)

    def update(share: float, sigma: float = 0.0, k: int = 1) -> dict[str, np.ndarray]:
        site.model.load_trainable_state(start)
        plan = _plan(noise_multiplier=sigma, sample_rate=1.0, steps_per_round=1, clip_norm=1e-3, users=1,
                     head_clip_share=share, baskets_per_user=k)
        optimizer = torch.optim.SGD([p for p in site.model.parameters() if p.requires_grad], lr=1.0)
        private_round(site.model, site.builder, plan=plan, optimizer=optimizer, targets={user: baskets},
                      negatives="catalogue", random_negatives=5, rng=np.random.default_rng(0))
        after = site.model.trainable_state()
        return {n: after[n] - start[n] for n in start}

    def norm(step: dict[str, np.ndarray], names) -> float:
        return float(np.sqrt(sum(np.sum(step[n] ** 2) for n in names)))

    rest = set(start) - head
    flat, split = update(0.0), update(0.25)
    # the only user, sampled: the step is their clipped gradient; the item tower dominates a flat clip
    assert norm(flat, head) < 0.2 * norm(flat, rest)
    assert 0 < norm(split, head) <= 1e-3 * 0.5 * (1 + 1e-4) and norm(split, head) > 2 * norm(flat, head)
    assert 0 < norm(split, rest) <= 1e-3 * np.sqrt(0.75) * (1 + 1e-4)
    assert norm(split, start) <= 1e-3 * (1 + 1e-4)
    # several baskets of a user share the bound of each group, too
    assert norm(update(0.25, k=2), head) <= 1e-3 * 0.5 * (1 + 1e-4)
    # the noise is σ·C, whatever the split
    for share in (0.0, 0.25):
        noisy, plain = update(share, 1.0), update(share)
        assert _noise_norm(np.concatenate([(noisy[n] - plain[n]).ravel() for n in start]), sigma=1.0, clip=1e-3)


@pytest.mark.parametrize("negatives", ["catalogue", "sampled"])
def test_per_sample_gradients_equal_each_users_own_gradient(site: SiteTrainer, negatives: str) -> None:
    """Opacus' per-user gradients (incl. the shared-catalogue item tower) equal one backward per user."""
    from opacus import GradSampleModule

    from hiermodel.data.split import Example

    users = list(site.targets)[:3]
    examples = [Example(u, site.targets[u][0]) for u in users]
    rng = np.random.default_rng(0)
    history, candidates = site.builder.training_batch(examples, rng=rng, negatives=negatives, random_negatives=4)
    module = GradSampleModule(site.model, batch_first=True, loss_reduction="sum")
    module.train()
    module.zero_grad()
    out = module(history, candidates)
    out.per_user_loss.sum().backward()
    per_sample = {n: p.grad_sample.clone() for n, p in site.model.named_parameters() if p.requires_grad}
    module.remove_hooks()
    for row, example in enumerate(examples):
        site.model.zero_grad()
        h, c = site.builder.training_batch([example], rng=np.random.default_rng(0), negatives=negatives, random_negatives=4)
        if negatives == "sampled":  # the same candidates as in the batch (the random draw differs)
            h, c = _row(history, row), _row(candidates, row)
        site.model(h, c).per_user_loss.sum().backward()
        for n, p in site.model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(per_sample[n][row], p.grad, atol=1e-5, rtol=1e-4), n
    for p in site.model.parameters():
        p.grad_sample = None


def _row(batch, row: int):
    """One user's slice of a batch dataclass (tensors with the batch first; shared tensors as they are)."""
    import dataclasses

    def part(name: str, value):
        shared = value is None or (name == "sentence" and value.dim() == 2)  # the catalogue is not per user
        return value if shared else value[row : row + 1]

    return type(batch)(**{f.name: part(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)})
