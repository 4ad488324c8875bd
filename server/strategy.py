"""Flower strategies by name, with a layer that records what each round received and sent."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg, FedYogi

from hiermodel.errors import ConfigError
from hiermodel.run_config import FedConfig

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg")


def message_bytes(msg: Message) -> int:
    """Payload bytes of a message's records (serialized arrays, metric and config values, keys)."""
    return sum(_config_bytes(r) if isinstance(r, ConfigRecord) else r.count_bytes() for r in msg.content.values())


def _config_bytes(record: ConfigRecord) -> int:
    # ConfigRecord.count_bytes() rejects empty strings (Flower 1.42), which our config sends
    def size(v) -> int:
        return len(v) if isinstance(v, (str, bytes)) else 1 if isinstance(v, bool) else 8

    return sum(len(k) + (sum(size(x) for x in v) if isinstance(v, list) else size(v)) for k, v in record.items())


class RoundLog:
    """Per round: which sites replied, what they sent and received, failures, timings."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict] = {}

    def entry(self, server_round: int) -> dict:
        return self.rounds.setdefault(server_round, {"round": server_round, "clients": {}, "failures": []})


class RecordingMixin:
    """Records each round: bytes down and up per client, their metrics, failures, the aggregates.

    Error replies and replies with no examples are left out of the aggregation (and counted).
    """

    round_log: RoundLog

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        entry = self.round_log.entry(server_round)
        entry["started"] = time.time()
        for m in messages:
            entry["clients"].setdefault(str(m.metadata.dst_node_id), {})["bytes_down_train"] = message_bytes(m)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        entry = self.round_log.entry(server_round)
        entry["replies_received"] = time.time()
        kept = self._usable(replies, entry, phase="train")
        started = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, kept) if kept else (None, None)
        entry["aggregation_seconds"] = time.perf_counter() - started
        entry["train"] = dict(metrics) if metrics else {}
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        entry = self.round_log.entry(server_round)
        kept = self._usable(list(replies), entry, phase="evaluate")
        metrics = super().aggregate_evaluate(server_round, kept) if kept else None
        entry["client_evaluate"] = dict(metrics) if metrics else {}
        return metrics

    def _usable(self, replies: list[Message], entry: dict, *, phase: str) -> list[Message]:
        """Replies to aggregate: not errors, and with a positive weight (a site with no users declines)."""
        kept = []
        for m in replies:
            node = str(m.metadata.src_node_id)
            if m.has_error():
                entry["failures"].append({"node": node, "phase": phase, "reason": m.error.reason[:300]})
                continue
            client = entry["clients"].setdefault(node, {})
            client[f"bytes_up_{phase}"] = message_bytes(m)
            client[f"{phase}_metrics"] = dict(m.content["metrics"])
            if m.content["metrics"].get("num-examples", 0) > 0:
                kept.append(m)
        return kept


SITE_ONLY_METRICS = ("site-index",)


def aggregate_site_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's weighted mean of the sites' metrics, without values that only mean something per site."""
    aggregated = aggregate_metricrecords(records, weighted_by_key)
    for key in SITE_ONLY_METRICS:
        aggregated.pop(key, None)
    return aggregated


def build_strategy(fed: FedConfig, round_log: RoundLog):
    """The configured Flower strategy (weighted by num-examples), wrapped to record every round."""
    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {fed.strategy!r}; valid: {', '.join(STRATEGIES)}")
    common = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_nodes,
        min_evaluate_nodes=fed.min_nodes,
        min_available_nodes=fed.min_nodes,
        weighted_by_key="num-examples",
    )
    base, extra = {
        "fedavg": (FedAvg, {}),
        "fedprox": (FedProx, {"proximal_mu": fed.proximal_mu}),
        "fedadam": (FedAdam, {"eta": fed.server_lr}),
        "fedyogi": (FedYogi, {"eta": fed.server_lr}),
        "fedtrimmedavg": (FedTrimmedAvg, {"beta": fed.trim_beta}),
    }[fed.strategy]
    recording = type(f"Recording{base.__name__}", (RecordingMixin, base), {})
    strategy = recording(**common, **extra, train_metrics_aggr_fn=aggregate_site_metrics,
                         evaluate_metrics_aggr_fn=aggregate_site_metrics)
    strategy.round_log = round_log
    return strategy
