"""`hierfed simulate`: arguments -> run config -> partitions -> Flower simulation."""

from __future__ import annotations

import argparse
from pathlib import Path

from hiermodel.errors import ConfigError
from hiermodel.jobs import write_json
from hiermodel.run_config import RunConfig, parse_overrides
from simulation.run import prepare_run, simulate


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
        "dp.target-epsilon": args.target_epsilon,
        "dp.target-delta": args.target_delta,
        "dp.noise-multiplier": args.noise_multiplier,
        "dp.central": args.central_dp,
    }
    flat.update({k: v for k, v in flags.items() if v is not None})
    if args.personal_lambda:
        flat["fed.personal-lambda"] = True
    if args.no_dp:
        flat["dp.enabled"] = False
    return RunConfig.from_flat(flat)


def run_simulate(args: argparse.Namespace) -> int:
    from simulation.faults import parse_faults

    faults = parse_faults(args.inject_fault)
    if args.resume:
        return resume_simulation(args.resume, cpus_per_site=args.cpus_per_site, faults=faults)
    if args.out is None:
        raise ConfigError("hierfed simulate needs --out RUN_DIR (or --resume RUN_DIR to continue a run)")
    if (args.out / "results.json").exists() and not args.overwrite:
        raise ConfigError(f"{args.out} already holds a run (results.json); continue it with --resume {args.out}, "
                          "pick another --out, or pass --overwrite to start over there")
    config = run_config_from_args(args)  # every setting is checked here, before Ray starts
    if args.overwrite:  # before this run writes anything there (its run_config.json, its partitions)
        from server.run_directory import RunDirectory

        RunDirectory(args.out).set_aside_previous_run(print)
    config, num_sites, encoding_seconds = prepare_run(
        config,
        out=args.out,
        partition=args.partition,
        num_clients=args.num_clients,
        min_site_users=args.min_site_users,
        alpha=args.alpha,
        server_eval=not args.no_server_eval,
    )
    if args.prepare_only:
        write_json(args.out / "run_config.json", config.to_flat())  # what `hierfed audit --empirical` reads
        print(flwr_run_command(config, num_sites))
        return 0
    simulate(config, num_sites=num_sites, cpus_per_site=args.cpus_per_site, encoding_seconds=encoding_seconds,
             faults=faults)
    return 0


def resume_simulation(run_dir: Path, *, cpus_per_site: float = 1.0, faults=None) -> int:
    """Continue a simulated run from its last completed round, on the partitions it was prepared with."""
    from hiermodel.data.store import read_manifest
    from server.run_directory import RunDirectory

    if not (run_dir / "run_config.json").exists():
        raise ConfigError(f"--resume {run_dir}: no run_config.json there; pass the --out folder of a simulated run")
    stored = RunDirectory(run_dir).read_config()
    if not stored.fed.partitions_dir or not Path(stored.fed.partitions_dir).is_dir():
        raise ConfigError(f"--resume {run_dir}: its partitions ({stored.fed.partitions_dir or 'none'}) are gone; "
                          "start a new run")
    flat = {**stored.to_flat(), "fed.resume": True, "fed.out-dir": str(run_dir.resolve())}  # this folder is the run
    num_sites = len(read_manifest(Path(stored.fed.partitions_dir)))
    simulate(RunConfig.from_flat(flat), num_sites=num_sites, cpus_per_site=cpus_per_site, faults=faults)
    return 0


def flwr_run_command(config: RunConfig, num_sites: int) -> str:
    """The same run through Flower's own CLI, on the partitions just prepared."""
    defaults = RunConfig.from_flat({}).to_flat()
    changed = {k: v for k, v in config.to_flat().items() if v != defaults.get(k)}
    pairs = " ".join(f"{k}={_toml(v)}" for k, v in changed.items())
    return (
        f"flwr run . local --stream --run-config '{pairs}' "
        f"--federation-config 'num-supernodes={num_sites} client-resources-num-cpus=1'"
    )


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, (int, float)) else '"' + str(value).replace('"', '\\"') + '"'



def run_bench_command(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from simulation.bench import SUITES, BenchSettings, run_bench
    from simulation.bench_quality import quality_settings
    from simulation.bench_scaling import scaling_settings

    flat = parse_overrides(args.run_config)
    if args.backbone:
        flat["model.backbone"] = args.backbone
    if args.dataset:
        flat["data.dataset"] = args.dataset
    if args.data_path:
        flat["data.data-path"] = args.data_path
    config = RunConfig.from_flat({k: v for k, v in flat.items() if k.split(".")[0] in ("data", "model")})
    # the scaling points choose their own data; every other key (model.*, dp.*, ...) applies to each of them
    scaling = scaling_settings(quick=args.quick, overrides={k: v for k, v in flat.items() if k != "data.dataset"},
                               points=args.scaling_points, rounds=args.rounds)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()] or list(SUITES)
    if (args.resume or args.resume_from) and "quality" not in suites:
        flag = "--resume" if args.resume else "--resume-from"
        raise ConfigError(f"{flag} continues the quality suite's table, and --suite {args.suite} has no quality: add it")
    quality = quality_settings(quick=args.quick, overrides=flat, seeds=args.seeds, epochs=args.epochs, rounds=args.rounds,
                               rows=args.rows, resume=args.resume, resume_from=tuple(args.resume_from))
    settings = BenchSettings(data=config.data, model=dataclasses.replace(config.model, use_popularity=True), scaling=scaling,
                             quality=quality)
    if args.quick:
        settings = dataclasses.replace(settings, steps=5, naive_steps=1, encode_items=128)
    run_bench(suites=suites, settings=settings, out=args.out, command="hierfed " + " ".join(sys.argv[1:]))
    return 0
