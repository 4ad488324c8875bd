"""Reliability: updates validated before aggregation, robust aggregation against a poisoned site,
faulty simulated sites, and a server killed mid-run and resumed with nothing lost or counted twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from client.site_state import SiteState
from hiermodel.cli import main
from hiermodel.errors import DataError
from hiermodel.run_config import FedConfig
from server.audit import audit_ledger
from server.ledger import LEDGER_FILE, PrivacyLedger, completed_rounds, read_ledger
from server.resume import find_resume_point
from server.run_directory import RunDirectory, split_checkpoint
from server.strategy import RoundLog, build_strategy
from server.update_validation import update_problem
from tests.helpers import send_round, train_reply

SENT = {"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.float32)}


@pytest.mark.parametrize("change, fragment", [
    (lambda s: {"a": s["a"]}, "missing b"),
    (lambda s: {**s, "backbone.weight": np.zeros(2, np.float32)}, "unexpected backbone.weight"),
    (lambda s: {**s, "a": np.zeros(4, np.float32)}, "a: float32[4] where float32[3] was sent"),
    (lambda s: {**s, "a": np.zeros(3, np.float64)}, "a: float64[3]"),
    (lambda s: {**s, "b": np.full((2, 2), np.nan, np.float32)}, "b: holds NaN or Inf"),
    (lambda s: {**s, "a": np.array([0, np.inf, 0], np.float32)}, "a: holds NaN or Inf"),
    (lambda s: {**s, "a": np.full(3, 10.0, np.float32)}, "update norm 17.32 is above the bound"),
])
def test_update_validation_names_what_is_wrong(change, fragment) -> None:
    assert update_problem(SENT, SENT, {"num-examples": 5}, max_update_norm=1.0) is None
    assert fragment in update_problem(SENT, change(dict(SENT)), {"num-examples": 5}, max_update_norm=1.0)


@pytest.mark.parametrize("weight", [float("nan"), -1, float("inf"), "ten", None])
def test_a_weight_that_is_not_a_count_is_rejected(weight) -> None:
    assert "num-examples" in update_problem(SENT, SENT, {"num-examples": weight} if weight is not None else {})


def test_rejected_updates_and_silent_sites_leave_the_global_model_alone() -> None:
    log = RoundLog()
    strategy = build_strategy(FedConfig(max_update_norm=50.0), log)
    send_round(strategy, 1, SENT, nodes=[1, 2, 3, 4, 5, 6])
    honest = {"a": np.array([1.0, 2.0, 3.0], np.float32), "b": np.full((2, 2), 2.0, np.float32)}
    replies = [
        train_reply(1, honest),
        train_reply(2, {**honest, "a": np.array([np.nan, 0, 0], np.float32)}),
        train_reply(3, {**honest, "b": np.zeros(4, np.float32)}),
        train_reply(4, {k: v * 1000 for k, v in honest.items()}),  # far past the norm bound
        train_reply(5, honest, examples=float("nan")),
    ]  # node 6 never answers
    arrays, _ = strategy.aggregate_train(1, replies)
    assert all(np.array_equal(arrays[k].numpy(), honest[k]) for k in honest)  # only the honest site counted
    entry = log.rounds[1]
    reasons = {r["node"]: r["reason"] for r in entry["rejected"]}
    assert set(reasons) == {"2", "3", "4", "5"}
    assert "NaN" in reasons["2"] and "float32[4]" in reasons["3"] and "update norm" in reasons["4"]
    assert "num-examples" in reasons["5"]
    assert [(f["node"], "no reply" in f["reason"]) for f in entry["failures"]] == [("6", True)]
    assert "sent_state" not in entry  # the round's copy of the model is released once aggregated


@pytest.fixture(scope="module")
def five_sites(tiny_backbone: str):
    """Five small synthetic sites and a trainer over all their users, for evaluation."""
    from hiermodel.data import load_dataset
    from hiermodel.data.synthetic import SyntheticConfig
    from hiermodel.model import HierModelConfig
    from hiermodel.site_trainer import SiteTrainer

    # the honest sites are alike (robust rules keep what most sites agree on; very different
    # honest sites look like outliers to them too)
    dataset = load_dataset("synthetic", synthetic=SyntheticConfig(num_users=100, num_sites=5, items_per_subtopic=5,
                                                                   mean_baskets=5.0, site_topic_concentration=50.0))
    config = HierModelConfig(backbone=tiny_backbone, max_tokens=8, dim=16)
    sites = [SiteTrainer(dataset.subset([i for i, u in enumerate(dataset.users) if u.site == s], name=s), config)
             for s in dataset.sites()]
    everyone = SiteTrainer(dataset, config)
    initial = {k: v.copy() for k, v in everyone.model.trainable_state().items()}  # before any run loads its state
    return sites, everyone, initial


def _federate(five_sites, strategy_name: str, *, poisoned: bool, rounds: int = 2) -> tuple[float, list[float]]:
    """The sites trained for real, aggregated by the named Flower strategy; site 0 poisons every
    update (flipped, 10×) when asked. Returns the global model's validation NDCG@10 and, per round,
    how far the aggregate lies from the honest sites' mean, in units of their own spread (the
    largest distance of an honest update from that mean)."""
    from hiermodel.training import TrainConfig
    from simulation.faults import POISON_SCALE

    sites, everyone, state = five_sites
    strategy = build_strategy(FedConfig(strategy=strategy_name, malicious_sites=1), RoundLog())
    train = TrainConfig(epochs=1, lr=0.01, seed=0)
    flat = lambda s: np.concatenate([s[k].ravel() for k in sorted(s)])  # noqa: E731
    offsets = []
    for server_round in range(1, rounds + 1):
        send_round(strategy, server_round, state, nodes=list(range(1, len(sites) + 1)))
        updates = [site.train(state, train_config=train, local_epochs=1, server_round=server_round).state for site in sites]
        honest = np.stack([flat(u) for u in updates[1:]])
        if poisoned:
            updates[0] = {k: state[k] - POISON_SCALE * (updates[0][k] - state[k]) for k in updates[0]}
        replies = [train_reply(node, u, examples=len(site.targets)) for node, (site, u) in enumerate(zip(sites, updates), 1)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        state = {k: a.numpy() for k, a in arrays.items()}
        centre = honest.mean(axis=0)
        offsets.append(float(np.linalg.norm(flat(state) - centre) / np.linalg.norm(honest - centre, axis=1).max()))
    return everyone.evaluate(state, split="validation")["ndcg@10"], offsets


def test_robust_aggregation_keeps_a_poisoned_run_near_the_clean_one(five_sites) -> None:
    rules = ("fedavg", "fedmedian", "krum")
    clean = {name: _federate(five_sites, name, poisoned=False)[0] for name in rules}
    poisoned = {name: _federate(five_sites, name, poisoned=True) for name in rules}
    print({"clean": clean, "poisoned": poisoned})
    # a robust rule's aggregate stays among the honest updates in every round; plain averaging is
    # pulled far outside them by the one site
    for robust in ("fedmedian", "krum"):
        assert max(poisoned[robust][1]) <= 1.0, (robust, poisoned)
    assert min(poisoned["fedavg"][1]) > 2.0, poisoned
    # and the global model keeps most of what the same rule reaches without the poisoned site (the
    # median is pulled a little towards the poisoned side in every coordinate, so it learns
    # slower), where plain averaging is left with next to nothing
    for robust in ("fedmedian", "krum"):
        assert poisoned[robust][0] >= 0.5 * clean[robust], (robust, clean, poisoned)
    assert poisoned["fedavg"][0] <= 0.25 * clean["fedavg"], (clean, poisoned)


# the round timeout of the faulty run: well above a round's time even with Ray starting in round 1;
# the hanging site answers 5 s after it
HANG_TIMEOUT = 40.0


@pytest.fixture(scope="module")
def faulty_run(tiny_backbone: str, tmp_path_factory):
    """4 simulated sites, 3 rounds, DP on. Round 1: site 1 crashes, site 3 sends an array the server
    never sent. Round 2: site 2 hangs past the round timeout, site 0 sends NaN."""
    from hiermodel.run_config import RunConfig
    from simulation.faults import parse_faults
    from simulation.run import prepare_run, simulate

    os.environ["FLWR_HOME"] = str(tmp_path_factory.mktemp("flwr-home"))
    out = tmp_path_factory.mktemp("faulty") / "run"
    config = RunConfig.from_flat({
        "data.synthetic-users": 120, "data.synthetic-sites": 4, "fed.rounds": 3, "fed.round-timeout": HANG_TIMEOUT,
        "model.backbone": tiny_backbone, "model.dim": 8, "model.max-tokens": 8, "model.max-history-items": 12,
        "model.max-baskets": 4, "train.batch-size": 16,
    })
    config, sites, _ = prepare_run(config, out=out, partition="natural", num_clients=None, log=lambda *_: None)
    faults = parse_faults(["crash@1:1", "extra-key@3:1", "hang@2:2", "nan@0:2"])
    results = simulate(config, num_sites=sites, faults=faults, log=lambda *_: None)
    return out, results


def test_the_run_survives_faulty_sites_and_counts_them(faulty_run) -> None:
    out, results = faulty_run
    first, second, third = results["rounds"]
    assert first["replies"] == {"train": 2, "declined": 0, "rejected": 1, "failed": 1}
    assert second["replies"] == {"train": 2, "declined": 0, "rejected": 1, "failed": 1}
    assert third["replies"] == {"train": 4, "declined": 0, "rejected": 0, "failed": 0}
    assert first["failures"][0]["reason"] == "injected fault: site 1 crashed in round 1"
    assert "unexpected backbone.embeddings" in first["rejected"][0]["reason"]
    assert "no reply before the round timeout" in second["failures"][0]["reason"]
    assert "holds NaN" in second["rejected"][0]["reason"]
    assert (out / "model" / "model.safetensors").is_file()
    # the ledger charges every site that trained, rejected or not; the hung site's round-2 steps,
    # which never reached the server in time, come in with its round-3 record as unreported steps
    records = [r for r in read_ledger(out / LEDGER_FILE) if r["kind"] == "site-round"]
    crashed, hung = first["failures"][0]["site"], second["failures"][0]["site"]
    charged = {(r["round"], r["site"]) for r in records}
    assert len(records) == 10 and (1, crashed) not in charged and (2, hung) not in charged
    late = next(r for r in records if r["site"] == hung and r["round"] == 3)
    assert late["unreported_steps"] == late["steps"] > 0  # one round's steps, at the same plan
    assert all(r["unreported_steps"] == 0 for r in records if r is not late)
    assert audit_ledger(out / LEDGER_FILE).ok


def _wait_for_rounds(path: Path, rounds: int, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before round {rounds}")
        try:
            if len(json.loads(path.read_text())["rounds"]) >= rounds:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no round {rounds} within {timeout}s")


def test_a_killed_server_resumes_with_nothing_lost_or_counted_twice(tiny_backbone: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_config = (f"data.synthetic-users=90 data.synthetic-sites=3 fed.rounds=4 model.backbone={tiny_backbone} "
                  "model.dim=8 model.max-tokens=8 model.max-history-items=12 model.max-baskets=4 train.batch-size=16")
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "hiermodel.cli", "simulate", "--dataset", "synthetic", "--out", str(out),
               "--run-config", run_config]
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_rounds(out / "results.json", 2, process)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the server, its Ray workers, the sites: mid-run
            process.wait()
    killed_after = len(json.loads((out / "results.json").read_text())["rounds"])
    assert 2 <= killed_after < 4
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]
    assert main(["simulate", "--resume", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4]  # each round once
    records = read_ledger(out / LEDGER_FILE)
    assert [r["round"] for r in records if r["kind"] == "round"] == [1, 2, 3, 4]
    report = audit_ledger(out / LEDGER_FILE)
    assert report.ok, report.findings
    # every step a site took is in the ledger: its own saved accountant history is the ledger's total
    run_id = json.loads((out / "run_config.json").read_text())["fed.run-id"]
    for path in (out / "site-state" / run_id).glob("*.json"):
        state = SiteState(path.parent.parent, run_id=run_id, site=path.stem).load()
        site_steps = sum(h[2] for h in json.loads(state["privacy"])["history"])
        site = next(r for r in report.sites if path.stem.endswith(r.site))
        assert site_steps == site.total_steps
    assert RunDirectory(out).read_config().fed.run_id == run_id  # the same run, not a new one


def test_a_resumed_fedadam_run_goes_on_with_its_moments(tiny_backbone: str, tmp_path: Path, monkeypatch) -> None:
    """FedAdam's moments are in each checkpoint: a run stopped after round 1 and resumed ends exactly where
    the same run without a stop did (without its moments the resumed round 2 would step from zero ones)."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    out = tmp_path / "run"
    run_config = (f"data.synthetic-users=60 data.synthetic-sites=2 fed.rounds=2 model.backbone={tiny_backbone} "
                  "model.dim=8 model.max-tokens=8 model.max-history-items=12 model.max-baskets=4 train.batch-size=16 "
                  "fed.strategy=\"fedadam\" fed.server-lr=0.01")
    assert main(["simulate", "--dataset", "synthetic", "--out", str(out), "--no-dp", "--run-config", run_config]) == 0
    run_dir = RunDirectory(out)
    results = json.loads((out / "results.json").read_text())
    straight = split_checkpoint(run_dir.load_checkpoint(2, results["rounds"][1]["checkpoint"]["sha256"]))
    after_round_1 = split_checkpoint(run_dir.load_checkpoint(1, results["rounds"][0]["checkpoint"]["sha256"]))[1]
    assert sorted({k.split("/")[0] for k in after_round_1}) == ["m_t", "v_t"] and straight[1]

    # the server stopped after round 1: its round-2 row and checkpoint never reached the disk
    run_dir.write_results({**results, "rounds": results["rounds"][:1]})
    run_dir.checkpoint_path(2).unlink()
    assert main(["simulate", "--resume", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    resumed = split_checkpoint(run_dir.load_checkpoint(2, results["rounds"][1]["checkpoint"]["sha256"]))
    for part, reference in zip(resumed, straight):  # the model, then the moments
        assert part.keys() == reference.keys()
        assert all(np.array_equal(part[k], reference[k]) for k in reference)


def _run_with_rounds(folder: Path, rounds: int) -> RunDirectory:
    """A run directory as the server leaves it after ``rounds`` DP rounds: checkpoints, ledger, rows."""
    run_dir = RunDirectory(folder)
    ledger = PrivacyLedger(folder / LEDGER_FILE)
    rows = []
    for k in range(1, rounds + 1):
        checkpoint = run_dir.checkpoint(k, {"w": np.full(3, k, np.float32)})
        ledger.append_round(k, [{
            "site": "north", "status": "trained", "accountant": "prv", "noise_multiplier": 1.0, "sample_rate": 0.1,
            "steps": 10, "total_steps": 10 * k, "clip_norm": 1.0, "delta": 1e-5, "epsilon": 0.5 * k,
            "budget_epsilon": 8.0, "users": 100}])
        rows.append({"round": k, "checkpoint": checkpoint})
        run_dir.write_results({"rounds": rows, "initial_server_evaluate": {"ndcg@10": 0.1}})
    return run_dir


def test_a_torn_ledger_write_is_set_aside_not_lost(tmp_path: Path) -> None:
    run_dir = _run_with_rounds(tmp_path, 3)
    ledger = tmp_path / LEDGER_FILE
    torn = '{"kind": "site-round", "round": 4, "site": "north", "seq'
    with open(ledger, "a") as f:
        f.write(torn)
    point = find_resume_point(run_dir, dp=True)
    assert point.completed == 3 and np.array_equal(point.state["w"], np.full(3, 3, np.float32))
    records, tail = completed_rounds(ledger)
    assert tail == [] and records[-1]["round"] == 3
    aside = list(tmp_path.glob(f"{LEDGER_FILE}.after-round-3.*"))
    assert len(aside) == 1 and aside[0].read_text() == torn + "\n"


def test_a_damaged_checkpoint_is_refused_and_its_round_trained_again(tmp_path: Path) -> None:
    run_dir = _run_with_rounds(tmp_path, 3)
    path = run_dir.checkpoint_path(3)
    path.write_bytes(path.read_bytes()[:-4])  # truncated
    point = find_resume_point(run_dir, dp=True)
    assert point.completed == 2 and np.array_equal(point.state["w"], np.full(3, 2, np.float32))
    assert [r["round"] for r in point.rows] == [1, 2] and point.initial == {"ndcg@10": 0.1}
    assert [r["round"] for r in read_ledger(tmp_path / LEDGER_FILE) if r["kind"] == "round"] == [1, 2]
    assert list(tmp_path.glob("results.json.after-round-2.*")) and list(tmp_path.glob(f"{LEDGER_FILE}.after-round-2.*"))
    # the round is trained again; the site's steps of the lost try come in as unreported steps
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE)
    ledger.append_round(3, [{
        "site": "north", "status": "trained", "accountant": "prv", "noise_multiplier": 1.0, "sample_rate": 0.1,
        "steps": 10, "total_steps": 40, "clip_norm": 1.0, "delta": 1e-5, "epsilon": 2.0, "budget_epsilon": 8.0,
        "users": 100}])
    assert read_ledger(tmp_path / LEDGER_FILE)[-2]["unreported_steps"] == 10


def test_a_ledger_edited_in_the_middle_is_refused(tmp_path: Path) -> None:
    run_dir = _run_with_rounds(tmp_path, 3)
    ledger = tmp_path / LEDGER_FILE
    lines = ledger.read_text().splitlines()
    lines[2] = lines[2].replace('"epsilon": 1.0', '"epsilon": 0.1')  # round 2's site record
    ledger.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="digest"):
        find_resume_point(run_dir, dp=True)


def test_a_damaged_site_state_is_refused(tmp_path: Path) -> None:
    state = SiteState(tmp_path, run_id="r1", site="0-north")
    assert state.load() is None
    state.save({"privacy": '{"history": [[1.0, 0.1, 10]]}', "lambda": None})
    assert state.load()["privacy"].startswith('{"history"')
    state.path.write_text(state.path.read_text().replace("10]]", "1]]"))  # steps forgotten
    with pytest.raises(DataError, match="checksum"):
        state.load()
    state.path.write_text("{")
    with pytest.raises(DataError, match="unreadable"):
        state.load()


@pytest.mark.parametrize("argv, fragment", [
    (["--inject-fault", "melt@1"], "expected KIND@SITE[:ROUND]"),
    (["--resume", "{tmp}/nowhere"], "no run_config.json there"),
    (["--out", "{tmp}/done"], "already holds a run"),
    ([], "needs --out RUN_DIR"),
])
def test_bad_reliability_arguments_are_one_line(argv, fragment, tmp_path: Path, capsys) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    assert main(["simulate", *(a.replace("{tmp}", str(tmp_path)) for a in argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_replies_flower_could_not_combine_are_rejected_not_fatal() -> None:
    from flwr.app import ConfigRecord

    log = RoundLog()
    strategy = build_strategy(FedConfig(strategy="fedmedian"), log)
    send_round(strategy, 1, SENT, nodes=[1, 2, 3, 4, 5])
    odd = train_reply(2, SENT)
    odd.content["metrics"]["surprise"] = 1.0  # Flower aggregates metrics only with the same keys everywhere
    two_arrays = train_reply(3, SENT)
    two_arrays.content["more"] = ArrayRecord({"a": Array(np.zeros(3, np.float32))})
    wrong_type = train_reply(4, SENT)
    wrong_type.content["metrics"] = ConfigRecord({"num-examples": 10})
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, SENT), odd, two_arrays, wrong_type, train_reply(5, SENT)])
    assert arrays is not None and all(np.array_equal(arrays[k].numpy(), SENT[k]) for k in SENT)
    entry = log.rounds[1]
    assert [r["node"] for r in entry["rejected"]] == ["2"] and "surprise" in entry["rejected"][0]["reason"]
    assert sorted(f["node"] for f in entry["failures"]) == ["3", "4"]
    assert all("expected exactly arrays (ArrayRecord), metrics (MetricRecord)" in f["reason"] for f in entry["failures"])


def test_a_ledger_from_before_the_digest_chain_still_audits(tmp_path: Path) -> None:
    _run_with_rounds(tmp_path, 2)
    ledger = tmp_path / LEDGER_FILE
    old = []
    for line in ledger.read_text().splitlines():
        record = json.loads(line)
        record.pop("digest" if record["kind"] == "round" else "unreported_steps")
        old.append(json.dumps(record))
    ledger.write_text("\n".join(old) + "\n")
    # read as before (the made-up ε of this ledger is a mismatch, nothing else: no gap, no tampering)
    assert {f.kind for f in audit_ledger(ledger).findings} == {"mismatch"}
    assert find_resume_point(RunDirectory(tmp_path), dp=True).completed == 2


def test_overwrite_sets_the_old_run_aside_before_writing(tiny_backbone: str, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    old = {"results.json": "{}", "ledger.jsonl": "{}\n", "run_config.json": '{"old": true}',
           "metrics.png": "png", "checkpoints/round-0001.safetensors": "weights"}
    for name, text in old.items():
        (run / name).write_text(text)
    argv = ["simulate", "--dataset", "synthetic", "--backbone", tiny_backbone, "--out", str(run), "--prepare-only",
            "--run-config", "data.synthetic-users=40 data.synthetic-sites=2"]
    assert main([*argv, "--overwrite", "--rounds", "0"]) == 2  # bad settings: nothing moves
    assert not list(run.glob("previous-*"))
    assert main([*argv, "--overwrite"]) == 0
    [previous] = run.glob("previous-*")
    assert {name: (previous / name).read_text() for name in old} == old  # the old run whole, its settings too
    assert json.loads((run / "run_config.json").read_text())["data.synthetic-users"] == 40  # the new run's
    assert "held an earlier run" in capsys.readouterr().out
