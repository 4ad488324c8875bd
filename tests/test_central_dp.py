"""Client-level central DP (dp.central): Flower's fixed-clipping wrappers and RDP accountant, the
ledger's record of the federation's mechanism, its independent audit, and two simulated runs."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent

from client.client_app import CLIPPING_NORM, central_clipping
from hiermodel.errors import ConfigError, DataError
from hiermodel.privacy import DPConfig
from hiermodel.run_config import FedConfig, RunConfig
from server.audit import audit_ledger, epsilon_series
from server.central_privacy import CENTRAL_SITE, plan_central
from server.ledger import LEDGER_FILE, PrivacyLedger, read_ledger
from server.strategy import RoundLog, build_strategy
from server.update_validation import update_norm
from tests.helpers import send_round, train_reply

SENT = {"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.float32)}


def _moved(by: float, direction=(1.0, 0.0, 0.0)) -> dict[str, np.ndarray]:
    """SENT moved by an update of norm ``by`` (in array a only)."""
    return {"a": (np.asarray(direction, np.float32) * by).astype(np.float32), "b": SENT["b"].copy()}


def _central(mode: str = "server-side", *, sites: int = 3, rounds: int = 3, **dp):
    return plan_central(DPConfig(central=mode, **dp), sites=sites, rounds=rounds)


@pytest.mark.parametrize("sites, rounds, epsilon", [(3, 2, 1.0), (37, 10, 8.0)])
def test_calibrated_noise_spends_the_central_budget_and_opacus_agrees(sites, rounds, epsilon) -> None:
    central = _central(sites=sites, rounds=rounds, central_target_epsilon=epsilon)
    assert central.delta == pytest.approx(1 / (10 * sites))
    event = GaussianPrivacyEvent(noise_multiplier=central.noise_multiplier, sample_size=sites, population_size=sites)
    central.accountant.compose(event, count=rounds)
    assert 0.98 * epsilon <= central.epsilon() <= epsilon  # Flower's accountant: the budget, spent
    # Opacus' RDP analysis (another implementation) gives the same bound
    ours = epsilon_series([(1.0, central.noise_multiplier, 1, central.delta)] * rounds, accountant="opacus-rdp")[-1]
    assert ours == pytest.approx(central.epsilon(), rel=0.005)
    assert central.accountant.would_exceed(event)  # one release more is over the budget


def _declined(node: int):
    """A site's reply when its budget is spent: the state it got, and other metric keys than a trained one's."""
    reply = train_reply(node, SENT, examples=0)
    reply.content["metrics"] = MetricRecord({"num-examples": 0, "dp-declined": 1})
    return reply


def test_server_side_clips_every_site_averages_them_equally_and_adds_the_noise() -> None:
    log = RoundLog()
    sigma = 1e-3
    central = _central(central_noise_multiplier=sigma, central_target_epsilon=1e9, central_clip_norm=1.0)
    strategy = build_strategy(FedConfig(), log, central=central)
    sent = {**SENT, "c": np.zeros(20_000, np.float32)}  # the noise shows on these
    send_round(strategy, 1, sent, nodes=[1, 2, 3])
    replies = [train_reply(1, {**_moved(0.5), "c": sent["c"]}, examples=10),
               train_reply(2, {**_moved(100.0, (0.0, 1.0, 0.0)), "c": sent["c"]}, examples=1000),  # clipped to C = 1
               _declined(3)]  # a zero update, still one of the three
    arrays, metrics = strategy.aggregate_train(1, replies)
    # equal weights whatever the sites' sizes
    np.testing.assert_allclose(arrays["a"].numpy(), [0.5 / 3, 1.0 / 3, 0.0], atol=2e-3)
    assert np.std(arrays["c"].numpy()) == pytest.approx(sigma * 1.0 / 3, rel=0.05)  # noise σ·C / n
    assert dict(metrics) == {"loss": 1.0}  # the trained sites' metrics, aggregated as without central DP
    record = log.rounds[1]["central"]
    assert (record["site"], record["status"], record["steps"], record["total_steps"]) == (CENTRAL_SITE, "trained", 1, 1)
    assert record["users"] == 3 and record["sample_rate"] == 1.0 and record["epsilon"] > 0
    assert log.rounds[1]["zero_updates"] == 1 and not log.rounds[1].get("rejected")


def test_a_site_that_fails_or_is_rejected_counts_as_a_zero_update_and_the_round_is_released() -> None:
    log = RoundLog()
    central = _central(central_noise_multiplier=1e-3, central_target_epsilon=1e9)
    strategy = build_strategy(FedConfig(), log, central=central)
    send_round(strategy, 1, SENT, nodes=[1, 2, 3])
    replies = [train_reply(1, _moved(0.5)), train_reply(2, {**SENT, "a": np.array([np.nan, 0, 0], np.float32)})]  # 3: silent
    arrays, _ = strategy.aggregate_train(1, replies)
    # released whatever the sites sent: whether a round is released says nothing about their data
    np.testing.assert_allclose(arrays["a"].numpy(), [0.5 / 3, 0.0, 0.0], atol=2e-3)
    assert central.releases == 1 and log.rounds[1]["central"]["status"] == "trained"
    assert log.rounds[1]["zero_updates"] == 2 and "NaN" in log.rounds[1]["rejected"][0]["reason"]


def test_the_central_budget_stops_the_rounds_before_it_is_overspent() -> None:
    sigma, sites = 2.0, 3
    probe = _central(sites=sites, central_noise_multiplier=sigma)
    event = GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=sites, population_size=sites)
    probe.accountant.compose(event, count=2)
    two = probe.epsilon()
    probe.accountant.compose(event)
    budget = (two + probe.epsilon()) / 2  # two releases fit, a third does not
    log = RoundLog()
    central = _central(sites=sites, central_noise_multiplier=sigma, central_target_epsilon=budget)
    strategy = build_strategy(FedConfig(), log, central=central)
    for server_round in (1, 2, 3):
        sent = send_round(strategy, server_round, SENT, nodes=[1, 2, 3])
        replies = [train_reply(n, _moved(0.1)) for n in (1, 2, 3)] if sent else []
        arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is None and central.releases == 2 and central.epsilon() <= budget
    assert [log.rounds[r]["central"]["status"] for r in (1, 2, 3)] == ["trained", "trained", "declined"]
    assert "central DP: round not run" in log.rounds[3]["failures"][0]["reason"]


def test_a_site_with_odd_metric_keys_still_counts_in_the_release_and_a_tiny_update_is_no_zero_division() -> None:
    log = RoundLog()
    central = _central(central_noise_multiplier=1e-3, central_target_epsilon=1e9)
    strategy = build_strategy(FedConfig(), log, central=central)
    send_round(strategy, 1, SENT, nodes=[1, 2, 3])
    odd = train_reply(2, _moved(0.3))
    odd.content["metrics"]["extra"] = 1.0
    tiny = train_reply(3, {**SENT, "a": np.array([1e-30, 0, 0], np.float32)})  # its float32 norm is 0
    arrays, metrics = strategy.aggregate_train(1, [train_reply(1, _moved(0.6)), odd, tiny])
    np.testing.assert_allclose(arrays["a"].numpy(), [0.9 / 3, 0.0, 0.0], atol=2e-3)
    assert log.rounds[1]["zero_updates"] == 0 and not log.rounds[1].get("rejected") and "extra" not in metrics
    assert log.rounds[1]["metrics_left_out"][0]["keys"] == "extra"


def test_a_round_sampling_other_sites_than_planned_is_not_run() -> None:
    log = RoundLog()
    central = _central(sites=3)
    strategy = build_strategy(FedConfig(), log, central=central)
    assert send_round(strategy, 1, SENT, nodes=[1, 2, 3, 4]) == []  # its noise is set for 3
    strategy.aggregate_train(1, [])
    assert central.releases == 0 and log.rounds[1]["central"]["status"] == "declined"
    assert "central DP: round not run" in log.rounds[1]["failures"][0]["reason"]


def test_client_side_mode_takes_an_update_the_site_did_not_clip_as_a_zero_update() -> None:
    log = RoundLog()
    central = _central("client-side", central_clip_norm=1.0, central_noise_multiplier=1e-3, central_target_epsilon=1e9)
    strategy = build_strategy(FedConfig(), log, central=central)
    messages = send_round(strategy, 1, SENT, nodes=[1, 2, 3])
    assert messages[0].content["config"][CLIPPING_NORM] == 1.0  # the wrapper tells the sites the clip norm
    # site 1 clipped, its float rounding a hair above C; site 3 did not clip at all
    replies = [train_reply(1, _moved(1.00005)), train_reply(2, _moved(0.2)), train_reply(3, _moved(5.0))]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["a"].numpy(), [1.2 / 3, 0.0, 0.0], atol=2e-3)
    assert "update norm 5 is above the bound dp.central-clip-norm (the site did not clip" in log.rounds[1]["rejected"][0]["reason"]
    assert log.rounds[1]["zero_updates"] == 1


def test_the_site_mod_clips_only_when_the_server_asks() -> None:
    arrays = ArrayRecord({k: Array(v) for k, v in SENT.items()})

    def message(config: dict) -> Message:
        metadata = Metadata(run_id=1, message_id="q1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                            group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
        return Message(metadata=metadata, content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}))

    def train(msg: Message, context) -> Message:  # a site that moves 3 from what it received
        reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in _moved(3.0).items()}),
                            "metrics": MetricRecord({"num-examples": 5})})
        return Message(reply, reply_to=msg)

    def declined(msg: Message, context) -> Message:  # hands back what it received
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 0})}),
                       reply_to=msg)

    clipped = central_clipping(message({CLIPPING_NORM: 0.5}), None, train)
    unclipped = central_clipping(message({}), None, train)
    unchanged = central_clipping(message({CLIPPING_NORM: 0.5}), None, declined)  # Flower's mod would divide by 0
    state = lambda m: {k: a.numpy() for k, a in m.content["arrays"].items()}  # noqa: E731
    assert update_norm(SENT, state(clipped)) == pytest.approx(0.5, rel=1e-5)
    assert update_norm(SENT, state(unclipped)) == pytest.approx(3.0)
    assert not unchanged.has_error() and update_norm(SENT, state(unchanged)) == 0.0


def test_central_dp_needs_a_uniform_average() -> None:
    with pytest.raises(ConfigError, match="dp.central needs fed.strategy fedavg or fedprox"):
        build_strategy(FedConfig(strategy="fedmedian"), RoundLog(), central=_central())
    with pytest.raises(ConfigError, match="unknown dp.central 'both'"):
        RunConfig.from_flat({"dp.central": "both"})
    with pytest.raises(ConfigError, match="dp.central needs fed.strategy fedavg or fedprox"):  # before anything runs
        RunConfig.from_flat({"dp.central": "server-side", "fed.strategy": "krum"})


def test_the_audit_recomputes_the_central_record_and_catches_a_wrong_epsilon(tmp_path) -> None:
    central = _central(sites=4, rounds=3, central_target_epsilon=4.0)
    event = GaussianPrivacyEvent(noise_multiplier=central.noise_multiplier, sample_size=4, population_size=4)
    honest, edited = PrivacyLedger(tmp_path / "honest.jsonl"), PrivacyLedger(tmp_path / "edited.jsonl")
    for server_round in (1, 2, 3):
        central.accountant.compose(event)
        record = central.ledger_record(server_round, released=True)
        honest.append_round(server_round, [record])
        edited.append_round(server_round, [{**record, "epsilon": record["epsilon"] * 0.8}])  # under-reported
    report = audit_ledger(tmp_path / "honest.jsonl")  # the sites' audit accountant (PLD) is not used for it
    assert report.ok, report.findings
    row = report.sites[0]
    assert row.site == CENTRAL_SITE and row.total_steps == 3 and row.epsilon_recomputed == pytest.approx(central.epsilon(), rel=0.01)
    findings = audit_ledger(tmp_path / "edited.jsonl").findings
    assert [f.kind for f in findings] == ["mismatch"] and "recomputed by opacus-rdp" in findings[0].message
    amplified = PrivacyLedger(tmp_path / "amplified.jsonl")
    amplified.append_round(1, [{**central.ledger_record(1, released=True), "sample_rate": 0.5}])
    assert "claims no amplification" in audit_ledger(tmp_path / "amplified.jsonl").findings[0].message


def test_a_resumed_run_keeps_its_mechanism_and_every_release_even_one_the_ledger_missed(tmp_path) -> None:
    state = tmp_path / "central_privacy.json"
    central = plan_central(DPConfig(central="server-side"), sites=4, rounds=5, state_path=state)
    event = GaussianPrivacyEvent(noise_multiplier=central.noise_multiplier, sample_size=4, population_size=4)
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE)
    central.accountant.compose(event)
    central.save()
    ledger.append_round(1, [central.ledger_record(1, released=True)])
    central.accountant.compose(event)
    central.save()  # round 2's model has left the server; the server dies before its ledger round
    # resumed with more sites connected: the mechanism is the one the releases were made with
    resumed = plan_central(DPConfig(central="server-side"), sites=4, connected=40, rounds=5, state_path=state)
    assert (resumed.noise_multiplier, resumed.delta, resumed.releases) == (central.noise_multiplier, central.delta, 2)
    resumed.accountant.compose(event)  # round 2 again
    ledger.append_round(2, [resumed.ledger_record(2, released=True)])
    record = read_ledger(tmp_path / LEDGER_FILE)[-2]
    assert (record["steps"], record["unreported_steps"], record["total_steps"]) == (1, 1, 3)  # the lost one, composed
    report = audit_ledger(tmp_path / LEDGER_FILE)
    assert report.ok, report.findings
    assert report.sites[0].epsilon_recomputed == pytest.approx(resumed.epsilon(), rel=0.01)
    with pytest.raises(ConfigError, match="sampled 4 sites a round when it started, and would sample 5 now"):
        plan_central(DPConfig(central="server-side"), sites=5, rounds=5, state_path=state)
    # the state file lost: the ledger's last central record stands in for it, never a new budget
    state.unlink()
    records = read_ledger(tmp_path / LEDGER_FILE)
    rebuilt = plan_central(DPConfig(central="server-side"), sites=4, rounds=5, state_path=state, ledger_records=records)
    assert (rebuilt.noise_multiplier, rebuilt.releases) == (central.noise_multiplier, 3)
    resumed.save()
    with pytest.raises(DataError, match="is not the ledger's"):
        plan_central(DPConfig(central="server-side"), sites=4, rounds=5, state_path=state,
                     ledger_records=[{**r, "noise_multiplier": 9.0} for r in records])


def test_the_default_central_delta_counts_every_connected_site() -> None:
    assert plan_central(DPConfig(central="server-side"), sites=10, connected=1000, rounds=2).delta == pytest.approx(1e-4)


def _simulate(tiny_backbone: str, out, **flat):
    from simulation.run import prepare_run, simulate

    config = RunConfig.from_flat({
        "data.synthetic-users": 60, "data.synthetic-sites": 3, "fed.rounds": 2,
        "model.backbone": tiny_backbone, "model.dim": 8, "model.max-tokens": 8, "model.max-history-items": 12,
        "model.max-baskets": 4, "train.batch-size": 32, **flat,
    })
    config, sites, _ = prepare_run(config, out=out, partition="natural", num_clients=None, log=lambda *_: None)
    return simulate(config, num_sites=sites, log=lambda *_: None)


@pytest.mark.parametrize("mode, local_dp", [("server-side", True), ("client-side", False)])
def test_a_simulated_run_with_central_dp_is_released_ledgered_and_audited(mode, local_dp, tiny_backbone, tmp_path) -> None:
    # a clip norm far below the sites' natural update: client-side rounds are released only if the sites clipped
    results = _simulate(tiny_backbone, tmp_path / "run", **{"dp.central": mode, "dp.enabled": local_dp,
                                                           "dp.central-clip-norm": 0.01})
    ledger = read_ledger(tmp_path / "run" / LEDGER_FILE)
    central = [r for r in ledger if r["kind"] == "site-round" and r["site"] == CENTRAL_SITE]
    assert [(r["round"], r["status"], r["total_steps"], r["users"]) for r in central] == [(1, "trained", 1, 3), (2, "trained", 2, 3)]
    assert 0 < central[0]["epsilon"] < central[1]["epsilon"] <= 8.0
    sites = {r["site"] for r in ledger if r["kind"] == "site-round"} - {CENTRAL_SITE}
    assert len(sites) == (3 if local_dp else 0)  # the sites' own DP-SGD records sit beside it
    assert [(row["rejected"], row["failures"]) for row in results["rounds"]] == [([], [])] * 2
    report = audit_ledger(tmp_path / "run" / LEDGER_FILE)
    assert report.ok, report.findings
