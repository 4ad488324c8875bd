"""Small builders shared by tests."""

from __future__ import annotations

import numpy as np

from hiermodel.data.dataset import Basket, Catalogue, Dataset, User

DAY = 86400.0


def toy_dataset(*, num_users: int = 40, num_items: int = 30, seed: int = 0, sites: int = 2, days_apart: float = 1.0) -> Dataset:
    """Users buying from a small catalogue with product-like titles, several baskets each, one every
    ``days_apart`` days."""
    rng = np.random.default_rng(seed)
    nouns = ["lantern", "teapot", "candle", "mug", "bag", "box"]
    colours = ["red", "blue", "white", "green", "pink"]
    texts = [f"{colours[i % 5]} {nouns[i % 6]} number {i}" for i in range(num_items)]
    catalogue = Catalogue([f"i{i}" for i in range(num_items)], texts, {"noun": [nouns[i % 6] for i in range(num_items)]})
    users = []
    for u in range(num_users):
        n = int(rng.integers(2, 7))
        baskets = [
            Basket(float(t * days_apart * DAY + u), np.unique(rng.choice(num_items, size=int(rng.integers(1, 6)), replace=False)).astype(np.int64))
            for t in range(n)
        ]
        users.append(User(f"u{u}", f"site-{u % sites}", baskets))
    return Dataset("toy", catalogue, users)


def prepared(dataset: Dataset, *, backbone: str, cache_root, **model):
    """(dataset, completed model config, feature builder) with a small model on the tiny backbone."""
    from hiermodel.model import HierModelConfig
    from hiermodel.pipeline import prepare

    config, builder = prepare(dataset, HierModelConfig(backbone=backbone, max_tokens=8, dim=16, **model),
                              cache_root=cache_root, progress=False)
    return dataset, config, builder


class StandInGrid:
    """Just enough of a Flower Grid for a strategy to configure a round: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def send_round(strategy, server_round: int, state: dict[str, np.ndarray], *, nodes: list[int]) -> list:
    """Configure a training round as the server does, and give each message the id a grid gives it
    when sending ("q<node>", which the replies of tests name as what they answer)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
    names = ("_task_id", "_run_id", "_node_id")  # a ServerApp's runtime sets them; messages carry them
    previous = [getattr(TaskIdentity, n) for n in names]
    for name in names:
        setattr(TaskIdentity, name, getattr(TaskIdentity, name) or 1)
    try:
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), StandInGrid(nodes)))
    finally:
        for name, value in zip(names, previous):
            setattr(TaskIdentity, name, value)
    for m in messages:
        m.metadata.__dict__["_message_id"] = f"q{m.metadata.dst_node_id}"
    return messages


def train_reply(node: int, arrays: dict[str, np.ndarray], examples: float = 10):
    """A site's training reply as the grid hands it to the strategy: answering message "q<node>"."""
    import time

    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"q{node}",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples, "loss": 1.0})})
    return Message(metadata=metadata, content=content)
