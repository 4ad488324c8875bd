"""Flower strategies by name, with a layer that records what each round received and sent."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from hiermodel.errors import ConfigError
from hiermodel.run_config import FedConfig, check_central_dp_strategy
from server.central_privacy import AGGREGATION_WEIGHT, CentralPrivacy, wrap
from server.update_validation import update_norm, update_problem

SERVER_MOMENTS = ("m_t", "v_t")  # Flower's FedOpt strategies (FedAdam, FedYogi) keep these across rounds
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

    Under central DP the wrapped strategy is Flower's DP wrapper around a uniformly weighted FedAvg,
    and every sampled site contributes to the release: its update if it is usable, a zero update
    otherwise (declined, failed, rejected, silent), so that the round is always released.
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

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The server optimizer's state that lives across rounds (FedAdam's and FedYogi's moments), by
        "moment/array"; empty for strategies without one. A checkpoint keeps it for a resumed run."""
        return {f"{moment}/{key}": value for moment in SERVER_MOMENTS
                for key, value in (getattr(self.strategy, moment, None) or {}).items()}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Give the wrapped strategy back the moments of optimizer_state()."""
        for moment in SERVER_MOMENTS:
            values = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith(f"{moment}/")}
            if values and hasattr(self.strategy, moment):
                setattr(self.strategy, moment, values)

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
        valid = [m for m in self._usable(replies, entry, phase="train") if self._valid(m, entry)]
        started = time.perf_counter()
        if self.central is not None:  # until the release is made: none
            entry["central"] = self.central.ledger_record(server_round, released=False)
        try:
            if self.central is not None:
                arrays, metrics = self._release(server_round, valid, entry)
            else:
                kept = self._same_metric_keys(valid, entry, reject=True)
                arrays, metrics = self.strategy.aggregate_train(server_round, kept) if kept else (None, None)
        except Exception as exc:  # noqa: BLE001 - replies Flower cannot combine must not end the run
            entry["failures"].append({"node": "server", "phase": "aggregate", "reason": f"round not aggregated: {exc}"[:300]})
            arrays, metrics = None, None
        entry["aggregation_seconds"] = time.perf_counter() - started
        del entry["sent"], entry["sent_state"]  # the round's copies of the model are not needed any more
        entry["train"] = dict(metrics) if metrics else {}
        return arrays, metrics

    def _release(self, server_round: int, valid: list[Message], entry: dict):
        """Flower's wrapper clips (server-side), averages every sampled site's contribution uniformly,
        adds the noise and composes the release; the spend is saved before the model leaves. Every
        valid update goes into the release; odd metric keys only keep a site's metrics out."""
        sent_state, sent = entry["sent_state"], entry["sent"]
        if not sent:  # the budget (or the sites connected) did not allow the round
            return None, None
        usable = {m.metadata.reply_to_message_id: m for m in valid}
        contributions, zero_updates = [], 0
        for message in sent:
            reply = usable.get(message.metadata.message_id)
            zero_updates += reply is None
            # in the order sent (Flower's clipping pairs arrays by position); a zero update without a usable reply
            state = {k: reply.content["arrays"][k].numpy() if reply is not None else v for k, v in sent_state.items()}
            state = _nonzero(state, sent_state) if self.central.mode == "server-side" else \
                _within(state, sent_state, self.central.clip_norm)
            contributions.append(Message(RecordDict({
                "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()}),
                "metrics": MetricRecord({AGGREGATION_WEIGHT: 1}),
            }), reply_to=message))
        before = self.central.releases
        arrays, _ = self.strategy.aggregate_train(server_round, contributions)
        released = self.central.releases > before
        if released:
            self.central.save()
        entry["central"] = self.central.ledger_record(server_round, released=released)
        entry["zero_updates"] = zero_updates
        reported = self._same_metric_keys(valid, entry, reject=False)
        metrics = aggregate_site_metrics([m.content for m in reported], "num-examples") if reported else None
        return (arrays if released else None), metrics

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
            # 0: the site declined; a training reply's other weights are validated with its update
            if (weight != 0) if phase == "train" else (isinstance(weight, (int, float)) and weight > 0):
                kept.append(m)
        if phase == "train":
            answered = {senders.get(m.metadata.reply_to_message_id, m.metadata.src_node_id) for m in replies}
            for node in sorted(set(senders.values()) - answered):
                entry["failures"].append({"node": str(node), "phase": phase,
                                          "reason": "no reply before the round timeout (fed.round-timeout)"})
        return kept

    @staticmethod
    def _same_metric_keys(replies: list[Message], entry: dict, *, reject: bool) -> list[Message]:
        """Flower aggregates metrics only when every reply has the same keys: the replies with the
        keys most sites sent (ties broken by the keys themselves); the others are rejected (one
        site's odd metrics must not stop a round), or with ``reject=False`` only left out of the metrics."""
        if not replies:
            return replies
        keys = [tuple(sorted(m.content["metrics"].keys())) for m in replies]
        common = max(sorted(set(keys)), key=keys.count)
        for m, k in zip(replies, keys):
            if k != common:
                differ = ", ".join(sorted(set(k) ^ set(common)))[:200]
                if reject:
                    _reject(entry, m, f"metric keys differ from the other sites': {differ}")
                else:
                    entry.setdefault("metrics_left_out", []).append({"node": str(m.metadata.src_node_id), "keys": differ})
        return [m for m, k in zip(replies, keys) if k == common]

    def _valid(self, reply: Message, entry: dict) -> bool:
        """Whether the reply's update may be aggregated; a rejected one is recorded with its reason."""
        received = {k: a.numpy() for k, a in reply.content["arrays"].items()}  # its shape was checked in _usable
        bound, name = self.max_update_norm, "fed.max-update-norm"
        clipped = self.central.clip_norm * (1 + CLIP_SLACK) if self.central is not None and self.central.mode == "client-side" else 0
        if clipped and not 0 < bound <= clipped:  # the sites say they clipped: check it
            bound, name = clipped, "dp.central-clip-norm (the site did not clip its update)"
        problem = update_problem(entry["sent_state"], received, reply.content["metrics"], max_update_norm=bound,
                                 bound_name=name)
        if problem:
            _reject(entry, reply, problem)
        return problem is None


def _nonzero(state: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An update whose norm is 0 in float32 (a zero update, or one of values below 1e-23), as the
    sent state moved by 1e-6 in one value: Flower's server-side clipping divides by the update's
    norm (ZeroDivisionError at 0 in Flower 1.42). Fixed and data-free, far below the noise."""
    if _float32_norm(state, sent) > 0:
        return state
    key = next(k for k, v in sent.items() if v.size and np.issubdtype(v.dtype, np.floating))
    nudged = sent[key].copy()
    i = int(np.argmin(np.abs(nudged)))
    value = nudged.flat[i]
    moved = value + nudged.dtype.type(1e-6)
    nudged.flat[i] = moved if moved != value else np.nextafter(value, np.inf)  # 1e-6 is below a large value's step
    nudged_state = {**sent, key: nudged}
    assert _float32_norm(nudged_state, sent) > 0
    return nudged_state


def _float32_norm(state: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> float:
    """The update's norm as Flower's clipping computes it (per array, in the arrays' dtype)."""
    return float(np.sqrt(sum(np.linalg.norm(np.subtract(state[k], sent[k]).flat) ** 2 for k in sent)))


def _within(state: dict[str, np.ndarray], sent: dict[str, np.ndarray], clip_norm: float) -> dict[str, np.ndarray]:
    """A site's own clipping, exact: validation lets float rounding pass (CLIP_SLACK), the release
    must not."""
    norm = update_norm(sent, state)
    if norm <= clip_norm:
        return state
    scale = clip_norm / norm
    return {k: (sent[k].astype(np.float64) + (state[k].astype(np.float64) - sent[k]) * scale).astype(sent[k].dtype)
            for k in sent}


def _reject(entry: dict, reply: Message, reason: str) -> None:
    """Record that a reply's update is left out of the aggregate, and why."""
    node = str(reply.metadata.src_node_id)
    entry.setdefault("rejected", []).append({"node": node, "reason": reason})
    entry["clients"][node]["rejected"] = reason


SITE_ONLY_METRICS = ("site-index", "num-examples", AGGREGATION_WEIGHT)  # a site's index and its weights
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
        check_central_dp_strategy(fed)
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
