"""The ServerApp: builds the initial trainable state, runs the configured strategy, evaluates and
checkpoints the global model each round, and writes the run directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from hiermodel.run_config import RunConfig
from server.global_model import GlobalModel
from server.results import RunResults
from server.run_directory import RunDirectory
from server.strategy import RoundLog, build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("flwr").propagate = False  # Opacus adds a root handler: don't print Flower's log twice
    run_server(grid, context.run_config)


def run_server(grid: Grid, flat_config: Mapping[str, object], *, log=print) -> dict:
    """One federated run; returns the results that it also writes to the run directory."""
    config = RunConfig.from_flat(dict(flat_config))
    run_dir = RunDirectory(Path(config.fed.out_dir))
    run_dir.write_config(config)
    global_model = GlobalModel(config)
    round_log = RoundLog()
    strategy = build_strategy(config.fed, round_log)
    results = RunResults(config=config, round_log=round_log, run_dir=run_dir, model=global_model, log=log)
    started = time.time()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        state = {k: a.numpy() for k, a in arrays.items()}
        evaluated = time.perf_counter()
        metrics = global_model.evaluate(state)
        results.end_round(server_round, state, metrics, evaluate_seconds=time.perf_counter() - evaluated)
        return MetricRecord(metrics) if metrics else None

    messages_config = ConfigRecord(dict(config.to_flat()))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in global_model.initial_state().items()}),
        num_rounds=config.fed.rounds,
        timeout=config.fed.round_timeout,
        train_config=messages_config,
        evaluate_config=ConfigRecord(dict(config.to_flat())),
        evaluate_fn=evaluate_fn,
    )
    return results.finish(result, wall_seconds=time.time() - started)
