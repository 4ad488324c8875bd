"""The DP popularity release: its sensitivity, its noise, its place in the plan, the site's features,
the ledger and the audit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hiermodel.data.split import split_examples
from hiermodel.features import NUM_REPEAT_FEATURES
from hiermodel.model import HierModelConfig
from hiermodel.private_popularity import (
    SECONDS_PER_WEEK, WINDOW_WEEKS, PopularityRelease, release_popularity, user_contributions, week_grid,
)
from hiermodel.privacy import DPConfig, PrivacyPlan, composed_epsilon, plan_privacy, release_noise
from hiermodel.site_trainer import SiteTrainer
from hiermodel.training import TrainConfig
from server.audit import audit_ledger
from server.ledger import LEDGER_FILE, PrivacyLedger
from tests.helpers import toy_dataset


def test_one_user_moves_the_counts_by_at_most_one_in_l2() -> None:
    dataset = toy_dataset(num_users=25, days_apart=3.0)
    start, weeks = week_grid(dataset)
    assert weeks >= 3
    everyone = user_contributions(dataset, start=start, weeks=weeks)
    for u in range(len(dataset.users)):  # the first and the last users too: the grid does not move
        rest = user_contributions(dataset.subset([i for i in range(len(dataset.users)) if i != u], name="x"),
                                  start=start, weeks=weeks)
        assert rest.shape == everyone.shape
        assert np.linalg.norm(everyone - rest) == pytest.approx(1.0)
    # baskets outside the grid count for nothing
    assert not user_contributions(dataset, start=start + weeks * SECONDS_PER_WEEK, weeks=2).any()


def test_the_release_is_noisy_unbiased_before_clipping_and_never_negative() -> None:
    dataset = toy_dataset(num_users=40, num_items=30)
    start, weeks = week_grid(dataset)
    exact = user_contributions(dataset, start=start, weeks=weeks)
    releases = np.stack([release_popularity(dataset, 0.3, start=start, weeks=weeks).counts for _ in range(300)])
    assert (releases >= 0).all() and not np.array_equal(releases[0], releases[1])
    popular = exact > 1.0  # where clipping at 0 (almost) never bites, the mean is the exact count
    assert popular.any()
    np.testing.assert_allclose(releases[:, popular].mean(0), exact[popular], atol=0.08)
    with pytest.raises(ValueError, match="needs noise"):
        release_popularity(dataset, 0.0, start=start, weeks=weeks)
    with pytest.raises(ValueError, match="public grid"):
        release_popularity(dataset, 1.0, start=start, weeks=0)


def test_features_read_only_whole_weeks_before_the_prediction() -> None:
    week = SECONDS_PER_WEEK
    counts = np.zeros((10, 3))
    counts[2, 0] = 5.0  # item 0 in week 2
    counts[8, 1] = 5.0  # item 1 in week 8
    release = PopularityRelease(start=0.0, counts=counts)
    overall, recent = release.at(2.5 * week)  # during week 2: its own week does not count
    assert not overall.any() and not recent.any()
    overall, recent = release.at(3.0 * week)
    assert overall[0] == recent[0] > 0 and overall[1] == 0
    overall, recent = release.at((3 + WINDOW_WEEKS) * week)  # week 2 has left the window
    assert overall[0] > 0 and recent[0] == 0
    overall, recent = release.at(100 * week)  # after the data: everything, the last window
    assert overall[0] > 0 and overall[1] > 0 and recent[1] > 0 and recent[0] == 0
    again = PopularityRelease.from_json(release.to_json())
    np.testing.assert_array_equal(again.at(9 * week)[0], release.at(9 * week)[0])


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_plan_spends_the_budget_on_steps_and_release_together(accountant: str) -> None:
    dp = DPConfig(target_epsilon=4.0, accountant=accountant, popularity_share=0.25)
    plain = plan_privacy(dp, num_users=500, batch_size=50, local_epochs=1, planned_rounds=5)
    plan = plan_privacy(dp, num_users=500, batch_size=50, local_epochs=1, planned_rounds=5, release=True)
    assert plain.release_noise_multiplier == 0 and plan.release_noise_multiplier > 0
    # on its own the release costs the share; beside the steps it costs the steps a little more noise
    alone = composed_epsilon([[plan.release_noise_multiplier, 1.0, 1]], delta=plan.delta, accountant=accountant)
    assert alone == pytest.approx(1.0, rel=0.02)
    assert plain.noise_multiplier < plan.noise_multiplier < 1.2 * plain.noise_multiplier
    total = plan.epsilon(5 * plan.steps_per_round, releases=1)
    assert 0.98 * 4.0 <= total <= 4.0
    assert plan.epsilon(5 * plan.steps_per_round) < total  # not yet released: not yet spent
    assert release_noise(DPConfig(popularity_share=0.0), delta=1e-5) == 0.0


@pytest.fixture(scope="module")
def private_site(tiny_backbone: str) -> SiteTrainer:
    config = HierModelConfig(backbone=tiny_backbone, max_tokens=8, dim=8, max_history_items=8, max_baskets=3,
                             max_basket_items=4)
    return SiteTrainer(toy_dataset(num_users=30, days_apart=4.0), config, private=True)  # over several weeks


def test_a_private_site_trains_on_its_release_never_on_plain_popularity(private_site: SiteTrainer, tiny_backbone) -> None:
    site = private_site
    assert isinstance(site.builder.popularity, PopularityRelease) and not site.builder.popularity.counts.any()
    # no public week grid, no release
    assert site.privacy_plan(DPConfig(), batch_size=10, local_epochs=1, planned_rounds=2).releases == 0
    start, weeks = week_grid(site.dataset)
    dp = DPConfig(target_epsilon=8.0, popularity_start=start, popularity_weeks=weeks)
    plan = site.privacy_plan(dp, batch_size=10, local_epochs=1, planned_rounds=2)
    assert plan.releases == 1 and np.shape(plan.popularity_release["counts"]) == (weeks, site.dataset.num_items)
    state = site.model.trainable_state()
    result = site.train(state, train_config=TrainConfig(batch_size=10), local_epochs=1, server_round=1, privacy=plan)
    np.testing.assert_array_equal(site.builder.popularity.counts, plan.popularity_release["counts"])
    assert result.metrics["dp-releases"] == 1 and result.metrics["dp-release-noise-multiplier"] > 0
    assert result.metrics["dp-epsilon"] == pytest.approx(plan.epsilon()) and plan.epsilon() <= 8.0
    # the features read the release
    examples = split_examples(site.dataset, "train")[-5:]
    _, candidates = site.builder.training_batch(examples, rng=np.random.default_rng(0), negatives="catalogue")
    assert candidates.features[..., NUM_REPEAT_FEATURES].any()
    # a round without this run's release (another run's plan, or none yet) does not keep the old one
    site.evaluate(state, split="validation", privacy=None)
    assert not site.builder.popularity.counts.any()
    # the plan is kept: a new process restores it, with the same release, and makes no other
    again = PrivacyPlan.from_json(plan.to_json())
    assert again.popularity_release == plan.popularity_release and again.epsilon() == pytest.approx(plan.epsilon())

    # a fixed σ whose first round leaves no room for the release: none is made, and the plan says so
    tight = site.privacy_plan(dataclasses.replace(dp, target_epsilon=1.0, noise_multiplier=0.3), batch_size=10,
                              local_epochs=1, planned_rounds=2)
    assert (tight.releases, tight.release_noise_multiplier, tight.noise_multiplier) == (0, 0.0, 0.3)

    plain = SiteTrainer(site.dataset, HierModelConfig(backbone=tiny_backbone, max_tokens=8, dim=8, max_history_items=8,
                                                      max_baskets=3, max_basket_items=4))
    with pytest.raises(ValueError, match="private=True"):
        plain.train(state, train_config=TrainConfig(batch_size=10), local_epochs=1, server_round=1, privacy=plan)


def _release_rounds(sigma_release: float = 2.0, *, released: bool = True) -> list[list[dict]]:
    """Two rounds of one site whose first round also made its popularity release (or made none)."""
    plan = PrivacyPlan(noise_multiplier=1.0, sample_rate=0.1, steps_per_round=10, delta=1e-5, budget_epsilon=8.0,
                       clip_norm=1.0, accountant="prv", users=320, release_noise_multiplier=sigma_release,
                       popularity_release={"start": 0.0, "counts": [[0.0]]} if released else None)
    rounds = []
    for server_round in (1, 2):
        plan.record(10)
        rounds.append([{"site": "west", "status": "trained", "accountant": "prv", "noise_multiplier": 1.0,
                        "sample_rate": 0.1, "steps": 10, "total_steps": plan.total_steps, "clip_norm": 1.0,
                        "delta": 1e-5, "epsilon": plan.epsilon(), "budget_epsilon": 8.0, "users": 320,
                        "release_noise_multiplier": sigma_release, "releases": plan.releases}])
    return rounds


def _write(folder, rounds) -> object:
    ledger = PrivacyLedger(folder / LEDGER_FILE)
    for server_round, records in enumerate(rounds, 1):
        ledger.append_round(server_round, [dict(r) for r in records])
    return folder / LEDGER_FILE


def test_the_audit_composes_the_release_once(tmp_path) -> None:
    path = _write(tmp_path, _release_rounds())
    report = audit_ledger(path)
    assert report.ok, report.findings
    assert report.sites[0].release_sigma == 2.0
    # without the release the steps alone cost less: the audit did compose it
    steps_only = composed_epsilon([[1.0, 0.1, 20]], delta=1e-5, accountant="prv")
    assert report.sites[0].epsilon_recomputed > steps_only + 0.1


@pytest.mark.parametrize("field,value,kind", [("releases", 0, "mismatch"), ("release_noise_multiplier", 9.0, "mismatch")])
def test_a_hidden_or_weakened_release_is_flagged(tmp_path, field: str, value, kind: str) -> None:
    rounds = _release_rounds()
    rounds[0][0][field] = value  # round 1 claims no release, or a noisier one, than it made
    report = audit_ledger(_write(tmp_path, rounds))
    assert kind in {f.kind for f in report.findings}


def test_a_release_that_disappears_is_a_gap(tmp_path) -> None:
    rounds = _release_rounds()
    rounds[1][0]["releases"] = 0
    report = audit_ledger(_write(tmp_path, rounds))
    assert any(f.kind == "gap" and "release" in f.message for f in report.findings)


def test_a_ledger_written_before_the_release_fields_still_audits_clean(tmp_path) -> None:
    import hashlib
    import json

    from server.ledger import RELEASE_FIELDS, SITE_FIELDS

    old_fields = [n for n in SITE_FIELDS if n not in RELEASE_FIELDS]
    digest, lines = "0" * 64, []
    for server_round, records in enumerate(_release_rounds(released=False), 1):  # as the last stop's server wrote them
        written = [{**{n: r[n] for n in old_fields if n in r}, "kind": "site-round", "round": server_round,
                    "seq": server_round, "unreported_steps": 0} for r in records]
        text = "\n".join([digest, *(json.dumps(w, sort_keys=True, separators=(",", ":")) for w in written)])
        digest = hashlib.sha256(text.encode()).hexdigest()
        lines += [json.dumps(w) for w in written]
        lines.append(json.dumps({"kind": "round", "round": server_round, "sites": ["west"], "digest": digest}))
    path = tmp_path / LEDGER_FILE
    path.write_text("\n".join(lines) + "\n")
    report = audit_ledger(path)
    assert report.ok, report.findings  # the digest chain holds, and ε agrees
    path.write_text(path.read_text().replace('"users": 320', '"users": 321', 1))
    assert "tampered" in {f.kind for f in audit_ledger(path).findings}  # and it still catches an edit
