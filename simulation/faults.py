"""Faults injected into simulated sites, to test that a run survives them (`hierfed simulate
--inject-fault KIND@SITE[:ROUND]`). Sites are named by partition index; without ROUND the fault
hits every round.

crash        the site's training raises: an error reply
hang         the site replies only after the round timeout: no reply in time
nan          the update holds NaN
poison       the update is flipped and scaled (global - 10 × the site's step): a poisoning site
wrong-shape  one array comes back cut short
extra-key    an array the server never sent rides along (as a leaked backbone tensor would)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hiermodel.errors import ConfigError

KINDS = ("crash", "hang", "nan", "poison", "wrong-shape", "extra-key")
POISON_SCALE = 10.0


@dataclass(frozen=True)
class Fault:
    kind: str
    site: int
    round: int | None = None  # None: every round

    def hits(self, site: int, server_round: int) -> bool:
        return site == self.site and self.round in (None, server_round)


def parse_faults(specs: list[str]) -> list[Fault]:
    """KIND@SITE[:ROUND] strings -> faults; ConfigError names a bad one."""
    faults = []
    for spec in specs:
        kind, _, where = spec.partition("@")
        site, _, server_round = where.partition(":")
        if kind not in KINDS or not site.isdigit() or (server_round and not server_round.isdigit()):
            raise ConfigError(f"--inject-fault {spec!r}: expected KIND@SITE[:ROUND] with KIND one of "
                              f"{', '.join(KINDS)}, SITE a partition index and ROUND a round number")
        faults.append(Fault(kind, int(site), int(server_round) if server_round else None))
    return faults


def faulty_client_app(faults: list[Fault], *, round_timeout: float):
    """Our ClientApp, with the given sites misbehaving as told (built per run, pickled to the workers)."""
    from flwr.app import Array, ArrayRecord, Message
    from flwr.clientapp import ClientApp

    from client import client_app as honest

    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        site = int(context.node_config.get("partition-id", -1))
        server_round = int(msg.content["config"]["server-round"])
        kinds = {f.kind for f in faults if f.hits(site, server_round)}
        if "crash" in kinds:
            raise RuntimeError(f"injected fault: site {site} crashed in round {server_round}")
        reply = honest.train(msg, context)
        if "hang" in kinds:
            time.sleep(round_timeout + 5.0)
        arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
        sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        key = next(iter(sorted(arrays)))
        if "nan" in kinds:
            arrays[key] = np.full_like(arrays[key], np.nan)
        if "poison" in kinds:
            arrays = {k: sent[k] - POISON_SCALE * (arrays[k] - sent[k]) for k in arrays}
        if "wrong-shape" in kinds:
            arrays[key] = arrays[key].reshape(-1)[:-1].copy()
        if "extra-key" in kinds:
            arrays["backbone.embeddings.word_embeddings.weight"] = np.zeros((8, 4), dtype=np.float32)
        if kinds - {"hang"}:
            reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        return reply

    app.evaluate()(honest.evaluate)
    return app
