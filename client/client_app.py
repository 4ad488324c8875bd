"""The ClientApp: one instance is one site. Its data, the frozen backbone and the encoding cache
stay here; replies carry only the trainable state and scalar metrics."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from client.site_data import site_trainer
from client.site_state import SiteState, state_root
from hiermodel.privacy import PrivacyPlan
from hiermodel.run_config import RunConfig
from hiermodel.site_trainer import LAMBDA_KEY
from hiermodel.training import round_lr

CLIPPING_NORM = "clipping_norm"  # what Flower's client-side central DP wrapper adds to the config


def central_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod for a run with client-side central DP (its wrapper sends the clip
    norm); other runs' messages pass untouched (the mod would refuse them)."""
    if not (msg.metadata.message_type.startswith("train") and CLIPPING_NORM in msg.content["config"]):
        return call_next(msg, context)
    reply = call_next(msg, context)
    if not reply.has_error() and _unchanged(msg, reply):
        return reply  # a declined round: nothing to clip (the mod would divide by its zero norm)
    return fixedclipping_mod(msg, context, lambda *_: reply)


def _unchanged(msg: Message, reply: Message) -> bool:
    sent, back = msg.content["arrays"], reply.content["arrays"]
    return sent.keys() == back.keys() and all(np.array_equal(sent[k].numpy(), back[k].numpy()) for k in sent)


app = ClientApp(mods=[central_clipping])

# keys the strategy adds to the config it sends, beside our run config
STRATEGY_KEYS = ("server-round", "proximal-mu", CLIPPING_NORM)
PERSONAL_LAMBDA = "personal-lambda"
PRIVACY = "privacy"


def _run_config(msg: Message) -> RunConfig:
    config = msg.content["config"]
    return RunConfig.from_flat({k: v for k, v in config.items() if k not in STRATEGY_KEYS})


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in msg.content["arrays"].items()}


def _metrics(values: dict) -> MetricRecord:
    """Scalar metrics only (MetricRecord takes plain int/float)."""
    return MetricRecord({k: int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else float(v)
                         for k, v in values.items()})


def _saved_state(context: Context, config: RunConfig, site, index: int) -> SiteState | None:
    """The site's state file for this run (None outside a run the server named, e.g. in unit tests)."""
    if not config.fed.run_id:
        return None
    name = str(context.node_config.get("site-name") or site.dataset.name)
    return SiteState(state_root(context.node_config), run_id=config.fed.run_id, site=f"{index}-{name}")


def _restore(context: Context, saved: SiteState | None) -> None:
    """What the site saved wins over what this process holds: a restarted site or a resumed run
    picks it up, and so does a round that starts while a late earlier round of the same site is
    still finishing elsewhere (Flower's simulation can run them in two workers at once)."""
    if saved is None:
        return
    state = saved.load()
    if state is None:
        return
    if state.get("privacy"):
        context.state[PRIVACY] = ConfigRecord({"plan": state["privacy"]})
    if state.get("lambda") is not None:
        context.state[PERSONAL_LAMBDA] = ArrayRecord({"lambda": Array(np.asarray(state["lambda"], dtype=np.float32))})


def _save(context: Context, saved: SiteState | None) -> None:
    if saved is None:
        return
    privacy = str(context.state[PRIVACY]["plan"]) if PRIVACY in context.state else None
    lam = context.state[PERSONAL_LAMBDA]["lambda"].numpy().tolist() if PERSONAL_LAMBDA in context.state else None
    saved.save({"privacy": privacy, "lambda": lam})


def _personal_lambda(context: Context, enabled: bool) -> np.ndarray | None:
    if enabled and PERSONAL_LAMBDA in context.state:
        return context.state[PERSONAL_LAMBDA]["lambda"].numpy()
    return None


def _saved_plan(context: Context) -> PrivacyPlan | None:
    return PrivacyPlan.from_json(str(context.state[PRIVACY]["plan"])) if PRIVACY in context.state else None


def _privacy_plan(context: Context, site, config: RunConfig) -> PrivacyPlan | None:
    """The site's DP mechanism and accountant history, kept in context.state (and on disk) for the whole run."""
    if not config.dp.enabled:
        return None
    if PRIVACY in context.state:
        return _saved_plan(context)
    dp = config.dp
    if "budget-epsilon" in context.node_config:  # a deployed site's own budget wins over the run's
        dp = dataclasses.replace(dp, target_epsilon=float(context.node_config["budget-epsilon"]))
    return site.privacy_plan(dp, batch_size=config.train.batch_size, local_epochs=config.fed.local_epochs,
                             planned_rounds=config.fed.rounds)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = _run_config(msg)
    site, index = site_trainer(context.node_config, config)
    received = _arrays(msg)
    server_round = int(msg.content["config"]["server-round"])
    saved = _saved_state(context, config, site, index)
    # one round of this site at a time loads, trains and saves (a late round may still run elsewhere)
    with saved.locked() if saved is not None else contextlib.nullcontext():
        _restore(context, saved)
        plan = _privacy_plan(context, site, config)
        result = site.train(
            received,
            train_config=dataclasses.replace(config.train, lr=round_lr(config.train.lr, server_round, config.fed.rounds,
                                                                       config.fed.lr_final)),
            local_epochs=config.fed.local_epochs,
            server_round=server_round,
            personal_lambda=_personal_lambda(context, config.fed.personal_lambda),
            proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
            privacy=plan,
            dp_config=config.dp,
        )
        if plan is not None:  # only a round that completed reaches here, so only those are charged
            context.state[PRIVACY] = ConfigRecord({"plan": plan.to_json()})
        state = result.state
        if config.fed.personal_lambda and LAMBDA_KEY in state:
            # λ stays here: keep it in the site's state, and hand the global λ back unchanged
            context.state[PERSONAL_LAMBDA] = ArrayRecord({"lambda": Array(state[LAMBDA_KEY])})
            state = {**state, LAMBDA_KEY: received[LAMBDA_KEY]}
        _save(context, saved)  # before the reply leaves: a spend is on the site's disk before anyone can see it
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(state[k])) for k in received}),
            "metrics": _metrics({**result.metrics, "site-index": index}),
        }
    )
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = _run_config(msg)
    site, index = site_trainer(context.node_config, config)
    _restore(context, _saved_state(context, config, site, index))
    metrics = site.evaluate(
        _arrays(msg),
        split=config.fed.evaluate_split,
        personal_lambda=_personal_lambda(context, config.fed.personal_lambda),
        privacy=_saved_plan(context) if config.dp.enabled else None,  # its popularity release, if any
    )
    return Message(RecordDict({"metrics": _metrics({**metrics, "site-index": index})}), reply_to=msg)
