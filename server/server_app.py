"""The ServerApp: builds the initial trainable state, runs the configured strategy, evaluates and
checkpoints the global model each round, and writes the run directory."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from hiermodel.heap import reuse_freed_memory
from hiermodel.run_config import RunConfig
from server.central_privacy import CentralPrivacy, plan_central, sampled_sites
from server.global_model import GlobalModel
from server.ledger import LEDGER_FILE, read_ledger
from server.results import RunResults
from server.resume import ResumePoint, describe, find_resume_point
from server.run_directory import CENTRAL_PRIVACY_FILE, RunDirectory
from server.strategy import RoundLog, build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("flwr").propagate = False  # Opacus adds a root handler: don't print Flower's log twice
    reuse_freed_memory()  # it evaluates the global model each round (in `hierfed simulate`, set already)
    run_server(grid, context.run_config)


def _central_privacy(grid: Grid, config: RunConfig, run_dir: RunDirectory) -> CentralPrivacy:
    """The federation's central DP mechanism for the sites sampled each round; a resumed run
    continues with the mechanism and the spend it saved."""
    sites, connected = sampled_sites(grid, config.fed)
    ledger = run_dir.folder / LEDGER_FILE
    return plan_central(config.dp, sites=sites, connected=connected, rounds=config.fed.rounds,
                        state_path=run_dir.folder / CENTRAL_PRIVACY_FILE,
                        ledger_records=read_ledger(ledger) if config.fed.resume and ledger.exists() else [])


def run_server(grid: Grid, flat_config: Mapping[str, object], *, log=print) -> dict:
    """One federated run (or the rest of one, with fed.resume); returns the results it also writes."""
    config = RunConfig.from_flat(dict(flat_config))
    run_dir = RunDirectory(Path(config.fed.out_dir))
    point = ResumePoint()
    if config.fed.resume:
        # the run goes on exactly as it started (its run id names the sites' saved privacy state)
        stored = run_dir.read_config()
        # the folder opened is the run (it may have been moved or copied since it started); a run
        # killed before it got its id gets one now, so its sites save what they spend from here on
        fed = dataclasses.replace(stored.fed, resume=True, out_dir=str(run_dir.folder),
                                  run_id=stored.fed.run_id or uuid.uuid4().hex)
        config = dataclasses.replace(stored, fed=fed)
        point = find_resume_point(run_dir, dp=config.dp.ledgered)
        log(describe(point, run_dir.folder, config.fed.rounds))
    else:
        run_dir.set_aside_previous_run(log)
        if not config.fed.run_id:
            config = dataclasses.replace(config, fed=dataclasses.replace(config.fed, run_id=uuid.uuid4().hex))
    run_dir.write_config(config)
    global_model = GlobalModel(config)
    round_log = RoundLog()
    central = _central_privacy(grid, config, run_dir) if config.dp.central != "off" else None
    strategy = build_strategy(config.fed, round_log, central=central)
    strategy.round_offset = point.completed
    strategy.load_optimizer_state(point.optimizer)  # FedAdam's / FedYogi's moments go on where they were
    results = RunResults(config=config, round_log=round_log, run_dir=run_dir, model=global_model, log=log)
    results.resume_from(point.rows, point.initial)
    started = time.time()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and point.completed:
            return None  # evaluated before round 1 when the run started
        state = {k: a.numpy() for k, a in arrays.items()}
        evaluated = time.perf_counter()
        metrics = global_model.evaluate(state)
        results.end_round(server_round + point.completed, state, metrics, evaluate_seconds=time.perf_counter() - evaluated,
                          optimizer=strategy.optimizer_state())
        return MetricRecord(metrics) if metrics else None

    state = point.state if point.state is not None else global_model.initial_state()
    remaining = config.fed.rounds - point.completed
    if remaining > 0:
        messages_config = ConfigRecord(dict(config.to_flat()))
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({k: Array(v) for k, v in state.items()}),
            num_rounds=remaining,
            timeout=config.fed.round_timeout,
            train_config=messages_config,
            evaluate_config=ConfigRecord(dict(config.to_flat())),
            evaluate_fn=evaluate_fn,
        )
        if len(result.arrays):  # no round aggregated anything: the model stays where it was
            state = {k: a.numpy() for k, a in result.arrays.items()}
    return results.finish(state, wall_seconds=time.time() - started)
