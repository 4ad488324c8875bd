"""The ClientApp's handlers called directly (no Ray): state across rounds, personal λ, budget declines."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

import client.client_app as client_app
from hiermodel.data.synthetic import SyntheticConfig, generate_synthetic
from hiermodel.run_config import RunConfig
from hiermodel.site_trainer import LAMBDA_KEY
from server.global_model import GlobalModel
from simulation.partitions import make_partitions, write_partitions


@pytest.fixture(scope="module")
def setup(tiny_backbone: str, tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts")
    dataset = generate_synthetic(SyntheticConfig(num_users=60, num_sites=2))
    write_partitions(dataset, make_partitions(dataset, scheme="natural", num_clients=None), folder)
    flat = {"model.backbone": tiny_backbone, "model.dim": 8, "model.max-tokens": 8, "model.max-history-items": 8,
            "model.max-baskets": 3, "train.batch-size": 16, "fed.partitions-dir": str(folder), "fed.rounds": 2}
    return flat


def _message(flat: dict, state: dict[str, np.ndarray], server_round: int, kind: str = "train") -> Message:
    config = ConfigRecord({**RunConfig.from_flat(flat).to_flat(), "server-round": server_round})
    metadata = Metadata(run_id=1, message_id=f"{kind}{server_round}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id=str(server_round), created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(metadata=metadata, content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                                                          "config": config}))


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})


def test_personal_lambda_stays_at_the_site_and_the_accountant_persists(setup) -> None:
    flat = {**setup, "fed.personal-lambda": True}
    state = GlobalModel(RunConfig.from_flat(flat)).initial_state()
    context = _context()
    reply = client_app.train(_message(flat, state, 1), context)
    sent = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert list(sent) == list(state)
    assert np.array_equal(sent[LAMBDA_KEY], state[LAMBDA_KEY])  # the global λ goes back unchanged
    personal = context.state[client_app.PERSONAL_LAMBDA]["lambda"].numpy()
    assert not np.array_equal(personal, state[LAMBDA_KEY])  # the site's own λ moved and stayed here
    eps1 = reply.content["metrics"]["dp-epsilon"]
    reply2 = client_app.train(_message(flat, sent, 2), context)
    assert reply2.content["metrics"]["dp-epsilon"] > eps1  # one accountant composed over the rounds
    assert reply2.content["metrics"]["dp-total-steps"] == 2 * reply.content["metrics"]["dp-steps"]
    evaluation = client_app.evaluate(_message(flat, sent, 2, "evaluate"), context)
    assert set(evaluation.content.keys()) == {"metrics"} and "ndcg@10" in evaluation.content["metrics"]


def test_a_site_past_its_budget_declines_with_a_status_not_an_error(setup) -> None:
    flat = {**setup, "dp.target-epsilon": 0.05, "dp.noise-multiplier": 0.5}
    state = GlobalModel(RunConfig.from_flat(flat)).initial_state()
    reply = client_app.train(_message(flat, state, 1), _context())
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert metrics["dp-declined"] == 1 and metrics["num-examples"] == 0 and metrics["dp-epsilon"] == 0
    assert all(np.array_equal(a.numpy(), state[k]) for k, a in reply.content["arrays"].items())


def test_without_dp_no_privacy_metrics_are_sent(setup) -> None:
    flat = {**setup, "dp.enabled": False}
    state = GlobalModel(RunConfig.from_flat(flat)).initial_state()
    metrics = client_app.train(_message(flat, state, 1), _context()).content["metrics"]
    assert metrics["num-examples"] > 0 and not any(k.startswith("dp-") for k in metrics)


def test_a_site_without_training_users_declines_quietly(setup, tmp_path) -> None:
    from hiermodel.data.dataset import Basket, Dataset, User
    from hiermodel.data.store import save_dataset

    dataset = generate_synthetic(SyntheticConfig(num_users=60, num_sites=2))
    lonely = Dataset("lonely", dataset.catalogue, [User("u", "s", [Basket(0.0, np.array([1]))])])  # one basket
    save_dataset(lonely, tmp_path / "0")
    flat = {**setup, "fed.partitions-dir": str(tmp_path)}
    state = GlobalModel(RunConfig.from_flat(flat)).initial_state()
    reply = client_app.train(_message(flat, state, 1), _context())
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == 0
