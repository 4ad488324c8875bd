"""`hierfed simulate`: prepare partitions once, then run the ServerApp and ClientApp on Flower's
Simulation Engine (Ray) in this process."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from hiermodel.data.store import save_dataset
from hiermodel.errors import ConfigError
from hiermodel.jobs import write_json
from hiermodel.private_popularity import week_grid
from hiermodel.run_config import RunConfig
from simulation.partitions import make_partitions, write_partitions

SITE_STATE_DIR = "site-state"  # the simulated sites' own disks, one folder per run id


def prepare_run(
    config: RunConfig,
    *,
    out: Path,
    partition: str,
    num_clients: int | None,
    min_site_users: int = 0,
    alpha: float = 0.5,
    server_eval: bool = True,
    log=print,
) -> tuple[RunConfig, int, float]:
    """Load the data once, write each site's partition (and the server's held-out copy), fill the
    shared encoding cache, and return the run config pointing at them, the number of simulated
    sites and the seconds the encoding took."""
    from server.strategy import STRATEGIES

    if config.fed.strategy not in STRATEGIES:  # before any work: a clear line, not a Ray traceback
        raise ConfigError(f"unknown strategy {config.fed.strategy!r}; valid: {', '.join(STRATEGIES)}")
    dataset = config.data.load()
    parts = make_partitions(dataset, scheme=partition, num_clients=num_clients, min_site_users=min_site_users,
                            alpha=alpha, seed=config.train.seed)
    folder = out / "partitions"
    write_partitions(dataset, parts, folder)
    log(f"data: {dataset.name}, {len(dataset.users)} users, {dataset.num_items} items -> {len(parts)} sites "
        f"({partition}): " + ", ".join(f"{p.name} {len(p.users)}" for p in parts[:8]) + (" …" if len(parts) > 8 else ""))
    flat = config.to_flat()
    if config.dp.enabled and not config.dp.popularity_weeks:
        # the operator's public choice of the weeks the popularity release covers: the data set's dates
        flat["dp.popularity-start"], flat["dp.popularity-weeks"] = week_grid(dataset)
    flat["fed.partitions-dir"] = str(folder.resolve())
    flat["fed.out-dir"] = str(out.resolve())
    if server_eval:
        flat["fed.server-eval-data"] = str(save_dataset(dataset, folder / "server-eval").resolve())
    return RunConfig.from_flat(flat), len(parts), encode_once(config, dataset.catalogue.texts)


def encode_once(config: RunConfig, texts: list[str]) -> float:
    """Fill the shared on-disk encoding cache before the sites start, so no site encodes the catalogue.

    Returns the seconds it took (near zero when the cache already holds every text).
    """
    from hiermodel.encoding_cache import encode_catalogue

    started = time.perf_counter()
    encode_catalogue(texts, backbone=config.model.backbone, max_tokens=config.model.max_tokens)
    return time.perf_counter() - started


def _worker_env(config: RunConfig) -> dict[str, str]:
    """What the sites' worker processes must see: the shared encoding cache, offline hub, and where
    the simulated sites keep their own state (beside the run, so a resumed simulation finds it)."""
    from client.site_state import STATE_DIR_ENV
    from hiermodel.encoding_cache import default_cache_root

    return {"HIERFED_CACHE": str(default_cache_root()), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            STATE_DIR_ENV: str(Path(config.fed.out_dir).resolve() / SITE_STATE_DIR)}


def simulate(config: RunConfig, *, num_sites: int, cpus_per_site: float = 1.0, encoding_seconds: float = 0.0,
             faults: list | None = None, log=print) -> dict:
    """Run the federation in this process; returns the results the server wrote.

    ``faults`` (simulation.faults.Fault) make the named sites misbehave, to test what the run survives.
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from server.server_app import run_server

    if faults:
        from simulation.faults import faulty_client_app

        client_app = faulty_client_app(faults, round_timeout=config.fed.round_timeout)
    else:
        from client.client_app import app as client_app

    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="hierfed-flwr-"))
    os.environ.update(_worker_env(config))  # Ray's workers start from this process's environment
    logging.getLogger("flwr").propagate = False  # Opacus adds a root handler: don't print Flower's log twice
    write_json(Path(config.fed.out_dir) / "run_config.json", config.to_flat())
    results: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:  # run_simulation passes no run config: hand ours over here
        results.update(run_server(grid, config.to_flat(), log=log))

    started = time.time()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_sites,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1},
        },
    )
    if not results:
        raise RuntimeError("the simulation ended without results; see the log above")
    wall = time.time() - started
    results["simulation"] = {"sites": num_sites, "wall_seconds": wall, "encoding_seconds": encoding_seconds,
                             "startup_and_shutdown_seconds": wall - results["wall_seconds"]}
    write_json(Path(config.fed.out_dir) / "results.json", results)
    log(f"simulation finished in {wall:.1f}s")
    return results
