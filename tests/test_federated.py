"""Federated training: our aggregation round by hand, the strategy registry, bad configuration,
and an in-process Flower simulation (3 sites x 2 rounds) whose every reply is checked."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict

from hiermodel.cli import main
from hiermodel.errors import ConfigError
from hiermodel.run_config import FedConfig, RunConfig
from server.strategy import STRATEGIES, RoundLog, build_strategy
from tests.helpers import send_round

ROOT = Path(__file__).resolve().parents[1]


def _reply(node: int, *, arrays: dict[str, np.ndarray] | None = None, metrics: dict | None = None, error: str = "") -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"q{node}",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    if error:
        return Message(metadata=metadata, error=Error(code=2, reason=error))
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)})
    return Message(metadata=metadata, content=content)


def test_one_round_of_aggregation_is_the_example_weighted_average() -> None:
    log = RoundLog()
    strategy = build_strategy(FedConfig(), log)
    w1 = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[0.0]], np.float32)}
    w2 = {"a": np.array([3.0, 6.0], np.float32), "b": np.array([[4.0]], np.float32)}
    w3 = {"a": np.array([100.0, 100.0], np.float32), "b": np.array([[100.0]], np.float32)}
    send_round(strategy, 1, {"a": np.zeros(2, np.float32), "b": np.zeros((1, 1), np.float32)}, nodes=[1, 2, 3, 4])
    replies = [
        _reply(1, arrays=w1, metrics={"num-examples": 10, "loss": 1.0, "site-index": 0}),
        _reply(2, arrays=w2, metrics={"num-examples": 30, "loss": 3.0, "site-index": 1}),
        _reply(3, arrays=w3, metrics={"num-examples": 0, "loss": 9.0, "site-index": 2}),  # no users: declines
        _reply(4, error="site crashed"),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # by hand: (10 * w1 + 30 * w2) / 40
    assert np.allclose(arrays["a"].numpy(), [2.5, 5.0])
    assert np.allclose(arrays["b"].numpy(), [[3.0]])
    assert metrics["loss"] == pytest.approx(2.5)
    assert "site-index" not in metrics
    entry = log.rounds[1]
    assert [f["reason"] for f in entry["failures"]] == ["site crashed"]
    assert entry["clients"]["1"]["bytes_up_train"] > 0


def test_strategies_by_name() -> None:
    for name in STRATEGIES:
        assert build_strategy(FedConfig(strategy=name), RoundLog()).round_log is not None
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'; valid: fedavg"):
        build_strategy(FedConfig(strategy="fedsgd"), RoundLog())


def test_pyproject_app_config_is_the_typed_default() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}
    flat = {}

    def flatten(prefix: str, table: dict) -> None:
        for k, v in table.items():
            flatten(f"{prefix}{k}.", v) if isinstance(v, dict) else flat.__setitem__(f"{prefix}{k}", v)

    flatten("", app["config"])
    defaults = RunConfig.from_flat({}).to_flat()
    # the same values, so that `flwr run` trains what `hierfed simulate` trains
    assert flat == {k: defaults[k] for k in flat if k in defaults}
    assert RunConfig.from_flat(flat).to_flat() == defaults
    assert set(flat) <= set(defaults)
    # every setting a user may give `flwr run --run-config` (Flower rejects keys the app does not
    # declare); only the sizes that follow from the data and the backbone are left out
    derived = {"model.backbone-dim", "model.num-features", "model.num-repeat-features", "model.stats-dim"}
    assert set(defaults) - set(flat) == derived


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--strategy", "fedsgd"], "unknown strategy"),
        (["--num-clients", "9"], "more than the 4 sites"),
        (["--rounds", "0"], "fed.rounds must be at least 1"),
        (["--partition", "iid", "--num-clients", "0"], "at least 1"),
    ],
)
def test_bad_configuration_is_one_line_before_ray_starts(extra, fragment, tmp_path, capsys) -> None:
    code = main(["simulate", "--out", str(tmp_path / "run"), "--run-config", "data.synthetic-users=40", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def simulated(tiny_backbone: str, tmp_path_factory):
    """3 sites x 2 rounds through Flower's Simulation Engine, recording every reply the server gets."""
    import server.strategy as strategy_module
    from simulation.run import prepare_run, simulate

    captured: list[tuple[str, RecordDict]] = []
    original = strategy_module.RecordingStrategy._usable

    def capture(self, replies, entry, *, phase):
        captured.extend((phase, m.content) for m in replies if not m.has_error())
        return original(self, replies, entry, phase=phase)

    strategy_module.RecordingStrategy._usable = capture
    out = tmp_path_factory.mktemp("sim") / "run"
    try:
        config = RunConfig.from_flat({
            "data.synthetic-users": 90, "data.synthetic-sites": 3, "fed.rounds": 2,
            "model.backbone": tiny_backbone, "model.dim": 8, "model.max-tokens": 8, "model.max-history-items": 12,
            "model.max-baskets": 4, "train.batch-size": 32,
        })
        config, sites, _ = prepare_run(config, out=out, partition="natural", num_clients=None, log=lambda *_: None)
        results = simulate(config, num_sites=sites, log=lambda *_: None)
    finally:
        strategy_module.RecordingStrategy._usable = original
    return out, results, captured, config


def test_simulation_writes_results_checkpoints_and_model(simulated) -> None:
    out, results, _, _ = simulated
    assert sites_trained(results) == [3, 3]
    written = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in written["rounds"]] == [1, 2]
    for r in written["rounds"]:
        assert {"loss", "lambda-word"} <= set(r["train"]) and "ndcg@10" in r["server_evaluate"]
        assert "ndcg@10" in r["client_evaluate"] and r["wall_seconds"] > 0
        assert set(r["clients"]) == {"site-0", "site-1", "site-2"}
        assert all(c["bytes_up_train"] > 0 and c["bytes_down_train"] > 0 for c in r["clients"].values())
    assert (out / "checkpoints" / "round-0002.safetensors").is_file()
    assert (out / "model" / "model.safetensors").is_file() and (out / "metrics.png").is_file()
    assert (out / "lambda.png").is_file() and (out / "run_config.json").is_file()


def sites_trained(results: dict) -> list[int]:
    return [r["replies"]["train"] for r in results["rounds"]]


def test_the_global_model_loads_and_evaluates(simulated, capsys) -> None:
    out, _, _, _ = simulated
    assert main(["evaluate", "--model", str(out), "--json", "--baselines", ""]) == 0
    assert "ndcg@10" in json.loads(capsys.readouterr().out)["hiermodel"]


def test_only_trainable_arrays_and_scalar_metrics_leave_a_site(simulated, tiny_backbone: str) -> None:
    """Every reply a site sent: no backbone tensor, no encodings, no ids, no text."""
    from hiermodel.backbone import FrozenBackbone
    from server.global_model import server_model_config
    from hiermodel.model import HierModel

    _, _, captured, config = simulated
    trainable = HierModel(server_model_config(config.model)).trainable_state()
    backbone = FrozenBackbone(tiny_backbone)
    backbone_shapes = {tuple(p.shape) for p in backbone.model.parameters() if p.numel() >= 256}
    allowed_metrics = {"num-examples", "train-examples", "loss", "train-seconds", "site-index", "users", "explore_users",
                       "lambda-word", "lambda-sentence", "lambda-paragraph", "mrr", "dp-declined",
                       *(f"dp-{k}" for k in ("noise-multiplier", "sample-rate", "steps", "total-steps", "clip-norm",
                                             "delta", "epsilon", "budget", "accountant", "users", "release-noise-multiplier",
                                             "releases", "grad-sample-bits")),
                       *(f"{m}@{k}" for m in ("recall", "ndcg", "explore_recall") for k in (10, 20))}
    phases = {phase for phase, _ in captured}
    assert phases == {"train", "evaluate"} and len(captured) == 12  # 3 sites x 2 rounds x (train + evaluate)
    for phase, content in captured:
        assert set(content.keys()) == ({"arrays", "metrics"} if phase == "train" else {"metrics"})
        assert not content.config_records  # no strings or bytes of any kind
        for name, value in content["metrics"].items():
            assert name in allowed_metrics, name
            assert isinstance(value, (int, float)) and not isinstance(value, bool)
        if phase == "train":
            arrays = {k: a.numpy() for k, a in content["arrays"].items()}
            assert list(arrays) == list(trainable)
            for k, v in arrays.items():
                assert v.shape == trainable[k].shape and v.dtype == np.float32
                assert tuple(v.shape) not in backbone_shapes or v.size < 256, k
            # the encoding cache would be (items, tokens, width) or (items, width)
            assert all(v.ndim <= 2 and backbone.dim not in v.shape[:1] for v in arrays.values() if v.size > 10_000)


def test_every_round_is_in_the_privacy_ledger_and_the_audit_agrees(simulated) -> None:
    from server.audit import audit_ledger
    from server.ledger import read_ledger

    out, results, _, _ = simulated
    records = [r for r in read_ledger(out / "ledger.jsonl") if r["kind"] == "site-round"]
    assert len(records) == 6 and {r["site"] for r in records} == {"site-0", "site-1", "site-2"}
    last = {r["site"]: r for r in records}
    for site, metrics in results["rounds"][-1]["sites"].items():
        assert last[site]["epsilon"] == pytest.approx(metrics["dp-epsilon"])
        assert last[site]["epsilon"] <= last[site]["budget_epsilon"]
    report = audit_ledger(out / "ledger.jsonl", tolerance=0.02)
    assert report.ok, report
