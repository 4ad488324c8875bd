"""`hierfed simulate`: arguments -> run config -> partitions -> Flower simulation."""

from __future__ import annotations

import argparse

from hiermodel.run_config import RunConfig, parse_overrides
from simulation.run import encode_once, prepare_run, simulate


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Run config defaults, then --run-config, then the explicit flags (which win)."""
    flat = parse_overrides(args.run_config)
    flags = {
        "data.dataset": args.dataset,
        "data.data-path": args.data_path,
        "data.session-gap-minutes": args.session_gap_minutes,
        "fed.rounds": args.rounds,
        "fed.strategy": args.strategy,
        "fed.local-epochs": args.local_epochs,
        "model.backbone": args.backbone,
    }
    flat.update({k: v for k, v in flags.items() if v is not None})
    if args.personal_lambda:
        flat["fed.personal-lambda"] = True
    return RunConfig.from_flat(flat)


def run_simulate(args: argparse.Namespace) -> int:
    config = run_config_from_args(args)  # every setting is checked here, before Ray starts
    config, num_sites = prepare_run(
        config,
        out=args.out,
        partition=args.partition,
        num_clients=args.num_clients,
        min_site_users=args.min_site_users,
        alpha=args.alpha,
        server_eval=not args.no_server_eval,
    )
    encode_once(config)
    simulate(config, num_sites=num_sites, cpus_per_site=args.cpus_per_site)
    return 0
