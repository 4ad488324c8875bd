"""Flower strategies by name, with a layer that records what each round received and sent."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from hiermodel.errors import ConfigError
from hiermodel.run_config import FedConfig
from server.central_privacy import AGGREGATION_WEIGHT, CentralPrivacy, check_strategy, wrap
from server.update_validation import update_problem

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg", "fedmedian", "krum", "bulyan")


def message_bytes(msg: Message) -> int:
    """Payload bytes of a message's records (serialized arrays, metric and config values, keys)."""
    return sum(_config_bytes(r) if isinstance(r, ConfigRecord) else r.count_bytes() for r in msg.content.values())


def _config_bytes(record: ConfigRecord) -> int:
    # ConfigRecord.count_bytes() rejects empty strings (Flower 1.42), which our config sends
    def size(v) -> int:
        return len(v) if isinstance(v, (str, bytes)) else 1 if isinstance(v, bool) else 8

    return sum(len(k) + (sum(size(x) for x in v) if isinstance(v, list) else size(v)) for k, v in record.items())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(reason: str) -> str:
    """The line that says what went wrong, out of an error reply's reason (Ray wraps it in a traceback)."""
    text = _ANSI.sub("", reason or "")
    if "Message: " in text:  # a ClientApp exception: Flower prefixes the site's own message with this
        text = text.rsplit("Message: ", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else "no reason given"
    return (line[:-2] if line.endswith("'>") else line)[:300]  # Flower closes the reason with '>


class RoundLog:
    """Per round: which sites replied, what they sent and received, failures, timings."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict] = {}

    def entry(self, server_round: int) -> dict:
        return self.rounds.setdefault(server_round, {"round": server_round, "clients": {}, "failures": []})


def _record_shape_problem(content: RecordDict, phase: str) -> str | None:
    """What is wrong with the records of a reply (training: one ArrayRecord "arrays" and one
    MetricRecord "metrics"; evaluation: the MetricRecord), or None."""
    expected = {"arrays": ArrayRecord, "metrics": MetricRecord} if phase == "train" else {"metrics": MetricRecord}
    found = {name: type(record).__name__ for name, record in content.items()}
    if set(found) != set(expected) or any(not isinstance(content[n], t) for n, t in expected.items()):
        wanted = ", ".join(f"{n} ({t.__name__})" for n, t in expected.items())
        return f"the reply holds {found or 'nothing'}; expected exactly {wanted}"
    return None


class RecordingStrategy(Strategy):
    """Wraps the configured strategy and records each round: bytes down and up per client, their
    metrics, failures, the aggregates.

    Before aggregation it leaves out error replies, replies with no examples (a site that
    declined), and updates that fail validation (recorded with the reason, their metrics kept for
    the privacy ledger: the site did train). Sites that never replied are recorded as failures.
    ``round_offset`` numbers the rounds of a resumed run after the rounds already completed.

    Under central DP the wrapped strategy is Flower's DP wrapper around a uniformly weighted FedAvg:
    a declined site's unchanged state then counts as a zero update (it was sampled), and the round
    is released only if every sampled site's update is usable (Flower's wrapper checks the count).
    """

    def __init__(self, strategy: Strategy, round_log: RoundLog, *, max_update_norm: float = 0.0,
                 central: CentralPrivacy | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.round_log = round_log
        self.max_update_norm = max_update_norm
        self.central = central
        self.round_offset = 0

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid):
        server_round += self.round_offset
        entry = self.round_log.entry(server_round)
        try:
            messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        except (PrivacyBudgetExhausted, ValueError) as exc:
            if self.central is None:
                raise
            # Flower's accounted wrapper refuses the round: no budget left, or not the n sites it was planned for
            entry["failures"].append({"node": "server", "phase": "train", "reason": f"central DP: round not run: {exc}"[:300]})
            messages = []
        entry["started"] = time.time()
        entry["sent"] = messages  # the grid gives each its message id when it sends it
        entry["sent_state"] = {k: a.numpy() for k, a in arrays.items()}
        for m in messages:
            entry["clients"].setdefault(str(m.metadata.dst_node_id), {})["bytes_down_train"] = message_bytes(m)
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        entry = self.round_log.entry(server_round)
        entry["replies_received"] = time.time()
        kept = self._same_metric_keys([m for m in self._usable(replies, entry, phase="train") if self._valid(m, entry)], entry)
        started = time.perf_counter()
        try:
            if self.central is not None:
                arrays, metrics = self._central_aggregate(server_round, kept, entry)
            else:
                arrays, metrics = self.strategy.aggregate_train(server_round, kept) if kept else (None, None)
        except Exception as exc:  # noqa: BLE001 - replies Flower cannot combine must not end the run
            entry["failures"].append({"node": "server", "phase": "aggregate", "reason": f"round not aggregated: {exc}"[:300]})
            arrays, metrics = None, None
        entry["aggregation_seconds"] = time.perf_counter() - started
        del entry["sent"], entry["sent_state"]  # the round's copies of the model are not needed any more
        entry["train"] = dict(metrics) if metrics else {}
        return arrays, metrics

    def _central_aggregate(self, server_round: int, kept: list[Message], entry: dict):
        """Flower's wrapper clips (server-side), averages uniformly, adds noise and composes the release."""
        for m in kept:
            m.content["metrics"][AGGREGATION_WEIGHT] = 1
            if self.central.mode == "server-side":
                _avoid_zero_update(m, entry["sent_state"])
        before = self.central.releases
        if entry["sent"] and len(kept) != len(entry["sent"]):
            entry["failures"].append({"node": "server", "phase": "aggregate", "reason": (
                f"central DP: {len(kept)} of the {len(entry['sent'])} sampled sites' updates are usable; the round "
                "is not released (its noise is set for all of them)")})
        # called whenever the round was sent, so that the wrapper drops the round's pending privacy event
        arrays, metrics = self.strategy.aggregate_train(server_round, kept) if entry["sent"] else (None, None)
        entry["central"] = self.central.ledger_record(server_round, released=self.central.releases > before)
        return (arrays, metrics) if self.central.releases > before else (None, None)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        entry = self.round_log.entry(server_round)
        kept = self._usable(list(replies), entry, phase="evaluate")
        if self.central is not None:  # the metrics stay weighted by the sites' users
            for m in kept:
                m.content["metrics"][AGGREGATION_WEIGHT] = m.content["metrics"]["num-examples"]
        try:
            metrics = self.strategy.aggregate_evaluate(server_round, kept) if kept else None
        except Exception as exc:  # noqa: BLE001 - as in aggregate_train
            entry["failures"].append({"node": "server", "phase": "evaluate", "reason": f"metrics not aggregated: {exc}"[:300]})
            metrics = None
        entry["client_evaluate"] = dict(metrics) if metrics else {}
        return metrics

    def _usable(self, replies: list[Message], entry: dict, *, phase: str) -> list[Message]:
        """Replies to aggregate: not errors, and with a positive weight (a site with no users declines)."""
        kept = []
        senders = {m.metadata.message_id: m.metadata.dst_node_id for m in entry.get("sent", [])} if phase == "train" else {}
        for m in replies:
            # a node that vanished is answered by the SuperLink: name the node the message went to
            node = str(senders.get(m.metadata.reply_to_message_id, m.metadata.src_node_id))
            if m.has_error():
                entry["failures"].append({"node": node, "phase": phase, "reason": short_reason(m.error.reason)})
                continue
            shape = _record_shape_problem(m.content, phase)
            if shape:
                entry["failures"].append({"node": node, "phase": phase, "reason": shape})
                continue
            client = entry["clients"].setdefault(node, {})
            client[f"bytes_up_{phase}"] = message_bytes(m)
            client[f"{phase}_metrics"] = dict(m.content["metrics"])
            weight = m.content["metrics"].get("num-examples")
            # 0: the site declined (under central DP its unchanged state is a zero update, kept); a
            # training reply's other weights are validated with its update
            if (weight != 0 or self.central is not None) if phase == "train" else (isinstance(weight, (int, float)) and weight > 0):
                kept.append(m)
        if phase == "train":
            answered = {senders.get(m.metadata.reply_to_message_id, m.metadata.src_node_id) for m in replies}
            for node in sorted(set(senders.values()) - answered):
                entry["failures"].append({"node": str(node), "phase": phase,
                                          "reason": "no reply before the round timeout (fed.round-timeout)"})
        return kept

    @staticmethod
    def _same_metric_keys(replies: list[Message], entry: dict) -> list[Message]:
        """Flower aggregates metrics only when every reply has the same keys: keep the replies with
        the keys most sites sent, reject the others (one site's odd metrics must not stop a round)."""
        if not replies:
            return replies
        keys = [frozenset(m.content["metrics"].keys()) for m in replies]
        common = max(set(keys), key=keys.count)
        for m, k in zip(replies, keys):
            if k != common:
                _reject(entry, m, f"metric keys differ from the other sites': {', '.join(sorted(k ^ common))[:200]}")
        return [m for m, k in zip(replies, keys) if k == common]

    def _valid(self, reply: Message, entry: dict) -> bool:
        """Whether the reply's update may be aggregated; a rejected one is recorded with its reason."""
        received = {k: a.numpy() for k, a in reply.content["arrays"].items()}  # its shape was checked in _usable
        bound = self.max_update_norm
        if self.central is not None and self.central.mode == "client-side":  # the sites say they clipped: check it
            bound = min(bound or math.inf, self.central.clip_norm * (1 + CLIP_SLACK))
        problem = update_problem(entry["sent_state"], received, reply.content["metrics"], max_update_norm=bound)
        if problem:
            _reject(entry, reply, problem)
        return problem is None


def _avoid_zero_update(reply: Message, sent: dict[str, np.ndarray]) -> None:
    """A declined site's reply is the state it received: a zero update, whose norm Flower's
    server-side clipping divides by (ZeroDivisionError in Flower 1.42). Move its smallest value by
    1e-6 instead: a fixed, data-free update far below the round's noise (σ·C / n per value)."""
    arrays = reply.content["arrays"]
    if any(not np.array_equal(arrays[k].numpy(), v) for k, v in sent.items()):
        return
    key = next(k for k, v in sent.items() if v.size and np.issubdtype(v.dtype, np.floating))
    nudged = sent[key].copy()
    i = int(np.argmin(np.abs(nudged)))
    nudged.flat[i] += 1e-6  # representable next to a value of magnitude below 1 in float32
    arrays[key] = Array(nudged)


def _reject(entry: dict, reply: Message, reason: str) -> None:
    """Record that a reply's update is left out of the aggregate, and why."""
    node = str(reply.metadata.src_node_id)
    entry.setdefault("rejected", []).append({"node": node, "reason": reason})
    entry["clients"][node]["rejected"] = reason


SITE_ONLY_METRICS = ("site-index", AGGREGATION_WEIGHT)
CLIP_SLACK = 1e-4  # float32 rounding of an update clipped to exactly C


def aggregate_site_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's weighted mean of the sites' metrics, without values that only mean something per site."""
    aggregated = aggregate_metricrecords(records, weighted_by_key)
    for key in SITE_ONLY_METRICS:
        aggregated.pop(key, None)
    return aggregated


def build_strategy(fed: FedConfig, round_log: RoundLog, *, central: CentralPrivacy | None = None) -> RecordingStrategy:
    """The configured Flower strategy (weighted by num-examples; uniformly under central DP, inside
    Flower's DP wrapper), wrapped to record every round."""
    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {fed.strategy!r}; valid: {', '.join(STRATEGIES)}")
    if central is not None:
        check_strategy(fed)
    common = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_nodes,
        min_evaluate_nodes=fed.min_nodes,
        min_available_nodes=fed.min_nodes,
        weighted_by_key="num-examples" if central is None else AGGREGATION_WEIGHT,
        train_metrics_aggr_fn=aggregate_site_metrics,
        evaluate_metrics_aggr_fn=aggregate_site_metrics,
    )
    base, extra = {
        "fedavg": (FedAvg, {}),
        "fedprox": (FedProx, {"proximal_mu": fed.proximal_mu}),
        "fedadam": (FedAdam, {"eta": fed.server_lr}),
        "fedyogi": (FedYogi, {"eta": fed.server_lr}),
        "fedtrimmedavg": (FedTrimmedAvg, {"beta": fed.trim_beta}),
        "fedmedian": (FedMedian, {}),
        "krum": (Krum, {"num_malicious_nodes": fed.malicious_sites}),
        "bulyan": (Bulyan, {"num_malicious_nodes": fed.malicious_sites}),
    }[fed.strategy]
    strategy = base(**common, **extra)
    if central is not None:
        strategy = wrap(strategy, central)
    return RecordingStrategy(strategy, round_log, max_update_norm=fed.max_update_norm, central=central)
