"""The hierarchical model: shapes, levels, combiner, trainable state, save/load, Opacus compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiermodel.data.split import split_examples
from hiermodel.model import HierModel, HierModelConfig
from hiermodel.pipeline import new_model
from tests.helpers import prepared, toy_dataset


@pytest.fixture(scope="module")
def toy(tiny_backbone: str, tmp_path_factory):
    return prepared(toy_dataset(), backbone=tiny_backbone, cache_root=tmp_path_factory.mktemp("cache"),
                    max_history_items=12, max_baskets=4, max_basket_items=6)


def _batch(builder, n=4, **kw):
    examples = split_examples(builder.dataset, "train")[:n]
    return builder.training_batch(examples, rng=np.random.default_rng(0), random_negatives=5, **kw)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_forward_shapes_and_loss(toy, levels: int) -> None:
    _, config, builder = toy
    config = HierModelConfig(**{**config.__dict__, "num_levels": levels})
    model = new_model(config)
    history, candidates = _batch(builder)
    out = model(history, candidates)
    b, c = candidates.mask.shape
    assert out.scores.shape == (b, c)
    assert out.level_scores.shape == (b, levels, c)
    assert out.lambdas.shape == (b, levels)
    assert torch.allclose(out.lambdas.sum(-1), torch.ones(b))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.attention) == set(("word", "sentence", "paragraph")[:levels])
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_level_loss_weight_changes_the_objective(toy) -> None:
    _, config, builder = toy
    history, candidates = _batch(builder)
    torch.manual_seed(0)
    with_levels = HierModel(config)
    without = HierModel(HierModelConfig(**{**config.__dict__, "level_loss_weight": 0.0}))
    without.load_state_dict(with_levels.state_dict())
    assert with_levels(history, candidates).loss > without(history, candidates).loss


def test_fixed_and_validation_combiner_have_no_trainable_lambda(toy) -> None:
    _, config, builder = toy
    fixed = new_model(HierModelConfig(**{**config.__dict__, "combiner": "fixed", "fixed_lambda": [0.0, 0.0, 2.0]}))
    assert "combiner.logits.weight" not in fixed.trainable_state()
    history, candidates = _batch(builder)
    assert fixed(history, candidates).lambdas[0].tolist() == [0.0, 0.0, 1.0]
    learned = new_model(config)
    assert "combiner.logits.weight" in learned.trainable_state()
    with pytest.raises(ValueError, match="non-negative"):
        fixed.combiner.set_fixed([1.0, -1.0, 0.0])


def test_packed_tokens_give_what_the_padded_layout_gives(toy) -> None:
    """The word level over each user's packed tokens equals the same layers over (B, H, T) padding: item
    vectors, user vector, attention and the gradient; the packing holds every real token once."""
    _, config, builder = toy
    model = new_model(config, seed=3).double()
    history, _ = _batch(builder, n=6)
    enc, t = builder.encodings, config.max_tokens
    ids = history.item_ids.clamp(min=0)
    mask = enc.token_mask[ids] & (history.item_ids >= 0).unsqueeze(-1)  # (B, H, T): the padded layout
    assert int(mask.sum()) == int(history.token_mask.sum()) and history.token_mask.shape[1] == int(mask.flatten(1).sum(1).max())
    states = enc.token_states[ids].double() * mask.unsqueeze(-1)
    history.token_states = history.token_states.double()
    word = model.word
    packed = word(history)
    x = torch.tanh(word.proj(states))
    items, _ = word.item_pool(x, mask)
    b, h, _, d = x.shape
    user, weights = word.user_pool(x.reshape(b, h * t, d), mask.reshape(b, h * t))
    torch.testing.assert_close(packed.units, items)
    torch.testing.assert_close(packed.user, user)
    torch.testing.assert_close(packed.attention, weights.view(b, h, t))
    grad = torch.autograd.grad(packed.units.sum() + (packed.user ** 2).sum(), word.proj.weight)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(items.sum() + (user ** 2).sum(), word.proj.weight)[0])


def test_segment_softmax_with_empty_segments_and_masked_rows() -> None:
    from hiermodel.pooling import segment_softmax

    scores = torch.tensor([[1.0, 2.0, 3.0, 50.0], [0.5, 0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [False, False, False, False]])
    segment = torch.tensor([[0, 0, 2, 0], [0, 0, 0, 0]])  # segment 1 of row 0 has no entry; row 1 none at all
    w = segment_softmax(scores, mask, segment, 3)
    torch.testing.assert_close(w[0, :2], torch.softmax(torch.tensor([1.0, 2.0]), 0))
    assert w[0, 2] == 1.0 and w[0, 3] == 0.0 and (w[1] == 0).all()
    (w * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[0, 3] == 0 and (scores.grad[1] == 0).all()


def test_trainable_state_round_trip_and_save_load(toy, tmp_path) -> None:
    _, config, builder = toy
    model = new_model(config, seed=1)
    state = model.trainable_state()
    assert all(v.dtype == np.float32 for v in state.values())
    assert sum(v.size for v in state.values()) == model.num_trainable_parameters()
    other = new_model(config, seed=2)
    other.load_trainable_state(state)
    history, candidates = _batch(builder)
    model.eval(), other.eval()
    assert torch.allclose(model(history, candidates).scores, other(history, candidates).scores)
    model.save_pretrained(tmp_path / "m")
    loaded = HierModel.from_pretrained(tmp_path / "m")
    assert torch.allclose(model(history, candidates).scores, loaded(history, candidates).scores)
    with pytest.raises(ValueError, match="mismatch"):
        other.load_trainable_state({k: v for k, v in state.items() if not k.startswith("word.")})
    bad = dict(state)
    name = next(iter(bad))
    bad[name] = np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match="shape"):
        other.load_trainable_state(bad)


def test_ranking_scores_the_whole_catalogue(toy) -> None:
    dataset, config, builder = toy
    model = new_model(config).eval()
    examples = split_examples(dataset, "test")[:3]
    history, candidates = builder.ranking_batch(examples)
    out = model(history, candidates)
    assert out.scores.shape == (3, dataset.num_items)
    # the sampled path and the full path give the same score for the same (user, item)
    hist2, cand2 = builder.training_batch(examples, rng=np.random.default_rng(0), random_negatives=3)
    sampled = model(hist2, cand2).scores
    ids = [list(dict.fromkeys(np.concatenate([dataset.users[e.user].baskets[e.target].items,
                                              hist2.item_ids[i][hist2.item_ids[i] >= 0].numpy()]).tolist()))
           for i, e in enumerate(examples)]
    for row, item_ids in enumerate(ids):
        assert torch.allclose(sampled[row, : len(item_ids)], out.scores[row, item_ids], atol=1e-4)


def test_one_opacus_step_gives_per_sample_gradients(toy) -> None:
    """Every trainable parameter sits in a layer Opacus' hooks support (no bare nn.Parameter)."""
    from opacus import PrivacyEngine

    _, config, builder = toy
    model = new_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    examples = split_examples(builder.dataset, "train")[:6]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(len(examples))), batch_size=3)
    engine = PrivacyEngine(accountant="prv")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    before = {k: v.copy() for k, v in model.trainable_state().items()}
    (indices,) = next(iter(loader))
    history, candidates = builder.training_batch(
        [examples[i] for i in indices.tolist()] or examples[:1], rng=np.random.default_rng(0), random_negatives=5
    )
    private(history, candidates).loss.backward()
    for name, p in private.named_parameters():
        if p.requires_grad:
            assert p.grad_sample is not None and p.grad_sample.shape[0] == len(history), name
    optimizer.step()
    after = model.trainable_state()
    assert any(not np.allclose(before[k], after[k]) for k in before)


def _hooked_tower(tower):
    """The tower alone under Opacus' hooks (a module of its own, as GradSampleModule wraps a model)."""
    from opacus import GradSampleModule

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = tower

        def forward(self, x, u):
            return self.tower(x, u)

    return GradSampleModule(Probe(), batch_first=True, loss_reduction="sum")


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, bias", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("users_a_chunk", [4, 3, 1])
def test_the_item_towers_per_sample_gradients_go_through_its_normalisation(shared: bool, dtype: torch.dtype, k: int,
                                                                           bias: bool, users_a_chunk: int,
                                                                           monkeypatch) -> None:
    """The item tower's own grad sampler, against one backward per user, with one item whose projection
    is below eps (F.normalize divides it by eps: no radial part) beside ordinary ones, a user vector of
    zeros, k vectors a user; in bfloat16 (dp.grad-sample-precision) to within 1 % of the norm, handed
    over as float32; the batch in one chunk of users, in chunks with a shorter last one, one user a chunk."""
    from hiermodel import scorer
    from hiermodel.scorer import ItemTower

    monkeypatch.setattr(scorer, "_CHUNK_ELEMENTS", users_a_chunk * 3 * 6)  # users × d × items
    torch.manual_seed(0)
    tower = ItemTower(5, 3)
    users, n = 4, 6
    items = torch.randn(n, 5) if shared else torch.randn(users, n, 5)
    with torch.no_grad():  # the first item (of user 0, per user) projects below eps
        if bias:  # exactly to 0, beside a nonzero bias
            tower.bias.copy_(-tower.weight @ items.reshape(-1, 5)[0])
        else:  # to 0 < |u| = |W x| < eps (no bias): the radial part must be dropped there
            tower.bias.zero_()
            items.reshape(-1, 5)[0] *= 1e-14
    vectors = torch.randn(users, k, 3)
    vectors[1] = 0.0  # a user whose vectors are all zero: F.normalize's eps on the user side
    vectors.requires_grad_(True)
    weights = torch.randn(users, k, n)  # each user's loss: Σ weights ⊙ cosines

    module = _hooked_tower(tower)
    tower.grad_sample_dtype = dtype
    (module(items, vectors) * weights).sum().backward()
    per_sample = {"weight": tower.weight.grad_sample.clone(), "bias": tower.bias.grad_sample.clone()}
    module.remove_hooks()
    assert per_sample["weight"].dtype == per_sample["bias"].dtype == torch.float32

    def close(per_user: torch.Tensor, reference: torch.Tensor) -> bool:
        if dtype == torch.float32:
            return torch.allclose(per_user, reference, rtol=1e-5, atol=1e-5)
        return bool((per_user - reference).norm() <= 0.01 * reference.norm())

    for user in range(users):
        tower.zero_grad()
        own = items if shared else items[user : user + 1]
        (tower(own, vectors[user : user + 1]) * weights[user]).sum().backward()
        assert close(per_sample["weight"][user], tower.weight.grad)
        assert close(per_sample["bias"][user], tower.bias.grad)
    assert per_sample["weight"][1].abs().sum() == 0 and per_sample["weight"].abs().sum() > 0


@pytest.mark.parametrize("shared", [True, False])
def test_the_item_towers_per_sample_gradients_of_no_candidates_are_zero(shared: bool) -> None:
    from hiermodel.scorer import ItemTower

    tower = ItemTower(5, 3)

    module = _hooked_tower(tower)
    users = torch.randn(2, 3, 3, requires_grad=True)
    items = torch.randn(0, 5) if shared else torch.randn(2, 0, 5)
    (module(items, users).sum() + 0 * users.sum()).backward()
    assert tower.weight.grad_sample.shape == (2, 3, 5) and not tower.weight.grad_sample.any()
    assert tower.bias.grad_sample.shape == (2, 3) and not tower.bias.grad_sample.any()
    module.remove_hooks()
