"""`hierfed bench --suite quality`: every method on one data set, side by side, with seeds.

Rows: the non-neural baselines (G-Pop, P-Pop, item-KNN, zero-shot LM, the gradient-boosted reranker),
the centralized model (the `hierfed train` path, in-process), federated non-private and with
user-level DP at each ε (the `hierfed simulate` path: Ray in-process, one run folder per run), and
ablations of the centralized model (fewer levels, each level alone, no per-level losses, no repeat
signal, fixed and validation-chosen λ). Every trained row is run once per seed and reported as
mean ± std; the goals of the quality issue are checked against the means.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from hiermodel.durable_files import atomic_write_text
from hiermodel.errors import ConfigError, DataError
from hiermodel.model import HierModelConfig
from hiermodel.privacy import DPConfig
from hiermodel.run_config import FedConfig
from hiermodel.training import TrainConfig

METRICS = ("ndcg@10", "recall@10", "recall@20", "mrr", "explore_recall@20")
KINDS = ("baseline", "centralized", "federated", "ablation")
EPSILONS = (8.0, 4.0, 1.0)
FULL_SEEDS = 3  # what the issue asks of the trained rows; used for the full-run estimate


@dataclass(frozen=True)
class Row:
    """One line of the quality table."""

    name: str
    kind: str
    label: str
    model: dict = field(default_factory=dict)  # HierModelConfig changes (centralized and ablations)
    baseline: str = ""  # baseline rows: the registry name
    epsilon: float | None = None  # federated rows: None is non-private


def all_rows(epsilons=EPSILONS) -> list[Row]:
    """Every row of the full suite, in table order."""
    rows = [Row(n, "baseline", label, baseline=n) for n, label in (
        ("gpop", "G-Pop"), ("ppop", "P-Pop"), ("itemknn", "item-KNN (all sites pooled)"),
        ("zeroshot", "zero-shot LM"), ("gbdt", "gradient-boosted reranker"))]
    rows.append(Row("central", "centralized", "hierarchical model, centralized (3 levels, learned λ)"))
    rows.append(Row("fed-nodp", "federated", "federated, non-private"))
    rows += [Row(f"fed-dp{e:g}", "federated", f"federated, DP ε = {e:g}", epsilon=float(e)) for e in epsilons]
    rows += [
        Row("levels-1", "ablation", "1 level (word)", {"num_levels": 1}),
        Row("levels-2", "ablation", "2 levels (word, sentence)", {"num_levels": 2}),
        Row("word-alone", "ablation", "word level alone (λ fixed 1, 0, 0)", {"combiner": "fixed", "fixed_lambda": [1.0, 0.0, 0.0]}),
        Row("sentence-alone", "ablation", "sentence level alone (λ fixed 0, 1, 0)", {"combiner": "fixed", "fixed_lambda": [0.0, 1.0, 0.0]}),
        Row("paragraph-alone", "ablation", "paragraph level alone (λ fixed 0, 0, 1)", {"combiner": "fixed", "fixed_lambda": [0.0, 0.0, 1.0]}),
        Row("no-level-loss", "ablation", "without the per-level losses", {"level_loss_weight": 0.0}),
        Row("no-repeat", "ablation", "without the repeat signal", {"use_repeat": False}),
        Row("lambda-fixed", "ablation", "fixed λ (1/3 each)", {"combiner": "fixed"}),
        Row("lambda-validation", "ablation", "λ chosen on validation (grid step 0.25)", {"combiner": "validation"}),
    ]
    return rows


def select_rows(spec: str, epsilons=EPSILONS) -> list[Row]:
    """Rows named in ``spec`` (comma-separated row names or kinds; empty = all), in table order."""
    rows = all_rows(epsilons)
    wanted = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if not wanted:
        return rows
    known = {r.name for r in rows} | set(KINDS)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ConfigError(f"unknown quality row {unknown[0]!r}; valid: {', '.join(KINDS)}, or a row: {', '.join(r.name for r in rows)}")
    return [r for r in rows if r.name in wanted or r.kind in wanted]


@dataclass
class QualitySettings:
    seeds: int = FULL_SEEDS
    epochs: int | None = None  # centralized epochs at most (early stopping on validation); None: train.epochs
    rounds: int = 10  # federated rounds
    rows: str = ""  # select_rows spec
    epsilons: tuple[float, ...] = EPSILONS
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    cpus_per_site: float = 1.0
    quick: bool = False
    resume: bool = False  # keep the runs an earlier invocation left in OUT/quality/quality.json (same settings)
    resume_from: tuple[Path, ...] = ()  # keep the runs of these tables too (same settings): other processes', a record
    synthetic_users: int | None = None  # synthetic data: this many users instead of data.synthetic-users
    model_changes: dict = field(default_factory=dict)  # HierModelConfig changes for every trained row (--quick: smaller)


def _pick(metrics: dict) -> dict[str, float]:
    return {m: float(metrics[m]) for m in METRICS}


def _summary(runs: list[dict]) -> tuple[dict, dict]:
    """Mean and sample std (0 for one run) of each metric over runs."""
    mean = {m: statistics.fmean(r["metrics"][m] for r in runs) for m in METRICS}
    std = {m: statistics.stdev(r["metrics"][m] for r in runs) if len(runs) > 1 else 0.0 for m in METRICS}
    return mean, std


def _central_run(dataset, model_config: HierModelConfig, train: TrainConfig, *, seed: int) -> dict:
    """One centralized training as `hierfed train` does it: fit with early stopping, then test."""
    from hiermodel.evaluation import evaluate_ranker
    from hiermodel.pipeline import new_model, prepare
    from hiermodel.ranker import HierRanker
    from hiermodel.training import choose_lambda_on_validation, fit, lambda_metrics

    config, builder = prepare(dataset, model_config, progress=False)
    train = dataclasses.replace(train, seed=seed)
    model = new_model(config, seed=seed)
    result = fit(model, builder, train)
    if config.combiner == "validation":
        choose_lambda_on_validation(model, builder, batch_size=train.eval_batch_size)
    test = evaluate_ranker(HierRanker(model, builder, batch_size=train.eval_batch_size), dataset, split="test")
    return {"metrics": _pick(test), "best_epoch": result.best_epoch, "epochs": len(result.history),
            "lambda": list(lambda_metrics(model).values()) if config.combiner == "learned"
            else model.combiner.fixed_lambda.tolist()}


def _federated_run(base_flat: dict, row: Row, *, seed: int, rounds: int, out: Path, cpus_per_site: float, log) -> dict:
    """One `hierfed simulate` run (natural partition: one site per data site) in its own folder."""
    from hiermodel.run_config import RunConfig
    from simulation.run import prepare_run, simulate

    flat = {**base_flat, "fed.rounds": rounds, "train.seed": seed, "dp.enabled": row.epsilon is not None}
    if row.epsilon is not None:
        flat["dp.target-epsilon"] = row.epsilon
    config = RunConfig.from_flat(flat)  # under DP the sites read popularity from their DP release
    # the bench prints one line per run instead of theirs
    config, sites, encoding = prepare_run(config, out=out, partition="natural", num_clients=None, log=_quiet)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # Flower's per-round INFO lines (every config key) would bury the table's progress
    try:
        results = simulate(config, num_sites=sites, cpus_per_site=cpus_per_site, encoding_seconds=encoding, log=_quiet)
    finally:
        flwr_log.setLevel(level)
    final = results["rounds"][-1]
    noise = [s["dp-noise-multiplier"] for s in final.get("sites", {}).values() if "dp-noise-multiplier" in s]
    trained = final.get("replies", {}).get("train")
    return {"metrics": _pick(final["server_evaluate"]), "rounds": len(results["rounds"]), "sites": sites,
            "sites_replied": trained, "noise_multiplier_range": [min(noise), max(noise)] if noise else None,
            "out": str(out)}


def _table_settings(data, model: HierModelConfig, settings: QualitySettings):
    """The data, model and train settings every run of the table uses, their flat run config, and the
    fingerprint that every run of one table must share (JSON's own form, so that a stored copy compares equal)."""
    from hiermodel.run_config import to_flat

    train = settings.train if settings.epochs is None else dataclasses.replace(settings.train, epochs=settings.epochs)
    if settings.synthetic_users and data.dataset == "synthetic":
        data = dataclasses.replace(data, synthetic_users=settings.synthetic_users)
    model = dataclasses.replace(model, **settings.model_changes)
    base_flat = {**to_flat(data, "data"), **to_flat(model, "model"), **to_flat(settings.train, "train"),
                 **to_flat(settings.fed, "fed"), **to_flat(settings.dp, "dp")}
    base_flat = {k: v for k, v in base_flat.items() if not k.startswith("fed.") or k in _FED_KEYS}
    fingerprint = json.loads(json.dumps({**base_flat, "bench.epochs": train.epochs, "bench.rounds": settings.rounds,
                                         "bench.quick": settings.quick}))
    return data, model, train, base_flat, fingerprint


def earlier_tables(folder: Path, fingerprint: dict, settings: QualitySettings, *, log=print,
                   check_only: bool = False) -> dict[str, dict[int, dict]]:
    """The runs to keep, by row and seed: OUT/quality/quality.json's with --resume (or --resume-from), then
    each --resume-from table's (the first copy of a run wins). ``check_only`` reads and checks them and
    sets nothing aside, so that a bad table stops the bench before any suite runs."""
    own = folder / "quality.json"
    say = _quiet if check_only else log
    resume = settings.resume or bool(settings.resume_from) or check_only  # a check never sets a table aside
    kept = {} if check_only and not own.exists() else _earlier_runs(own, fingerprint, resume=resume, log=say)
    for table in settings.resume_from:  # e.g. rows that other processes ran at the same time
        for name, runs in _earlier_runs(table, fingerprint, resume=True, log=say, flag="--resume-from").items():
            for seed, run in runs.items():
                kept.setdefault(name, {}).setdefault(seed, run)
    return kept


def check_earlier_tables(data, model: HierModelConfig, settings: QualitySettings, *, out: Path) -> None:
    """Before any suite runs: the tables --resume / --resume-from would keep are readable and made with
    these settings (else one line and exit 2, with no suite's figures lost)."""
    if settings.resume or settings.resume_from:
        earlier_tables(out / "quality", _table_settings(data, model, settings)[-1], settings, check_only=True)


def _quiet(*_) -> None:
    return None


def quality_suite(data, model: HierModelConfig, settings: QualitySettings, *, out: Path, log=print) -> dict:
    """Run the selected rows over the seeds; write quality.json after every run and quality.png at the end.

    With ``settings.resume`` the runs already in OUT/quality/quality.json are kept (the settings must be the
    same) and only the missing (row, seed) runs are made, so the full suite can be run over several sittings;
    without it an earlier quality.json is set aside, never overwritten. ``settings.resume_from`` adds the runs
    of other tables (the same settings), so that rows run by several processes at once make one table."""
    from hiermodel.jobs import evaluate_baselines
    from hiermodel.pipeline import prepare

    if settings.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {settings.seeds}")
    rows = select_rows(settings.rows, settings.epsilons)
    data, model, train, base_flat, fingerprint = _table_settings(data, model, settings)
    folder = out / "quality"
    kept = earlier_tables(folder, fingerprint, settings, log=log)
    started = time.perf_counter()
    dataset = data.load()
    summary = dataset.summary()
    report: dict = {
        "data": {"name": dataset.name, "users": len(dataset.users), "items": dataset.num_items, "summary": summary},
        # the seeds of this run and of every run kept (a merged table may hold more than --seeds)
        "settings": {"seeds": sorted({*range(settings.seeds), *(seed for runs in kept.values() for seed in runs)}), "epochs": train.epochs, "patience": train.patience,
                     "rounds": settings.rounds, "local_epochs": settings.fed.local_epochs, "epsilons": list(settings.epsilons), "rows": [r.name for r in rows],
                     "quick": settings.quick, "train": dataclasses.asdict(train)},
        "config": fingerprint,
        "metrics": list(METRICS),
        "rows": [],
    }
    folder.mkdir(parents=True, exist_ok=True)
    commit = code_version()
    vectors = None
    finished: dict[str, dict] = {}  # row name -> its row of the report
    for row in all_rows(settings.epsilons):
        runs = sorted(kept.get(row.name, {}).values(), key=lambda r: r["seed"])
        if row in rows:
            seeds = [0] if row.kind == "baseline" else range(settings.seeds)  # baselines are deterministic
            for seed in seeds:
                if any(r["seed"] == seed for r in runs):
                    log(f"quality: {row.name} seed {seed}: kept from the earlier run")
                    continue
                t0 = time.perf_counter()
                if row.kind == "baseline":
                    if vectors is None:
                        _, builder = prepare(dataset, model, progress=False)
                        vectors = builder.encodings.sentence.float().numpy()
                    run = {"metrics": _pick(evaluate_baselines(dataset, [row.baseline], item_vectors=vectors)[row.baseline])}
                elif row.kind == "federated":
                    run = _federated_run(base_flat, row, seed=seed, rounds=settings.rounds, out=folder / f"{row.name}-seed{seed}",
                                         cpus_per_site=settings.cpus_per_site, log=log)
                else:
                    run = _central_run(dataset, dataclasses.replace(model, **row.model), train, seed=seed)
                run = {"seed": seed, **run, "seconds": time.perf_counter() - t0, "commit": commit}
                runs = sorted([*runs, run], key=lambda r: r["seed"])
                log(f"quality: {row.name} seed {seed}: ndcg@10 {run['metrics']['ndcg@10']:.4f}  "
                    f"explore@20 {run['metrics']['explore_recall@20']:.4f}  ({run['seconds']:.1f}s)")
                finished[row.name] = _row_summary(row, runs)
                _set_rows(report, finished, started)
                # rewritten whole after every run, so that a long run that stops keeps what it has
                atomic_write_text(folder / "quality.json", json.dumps(report, indent=2))
        if runs and row.name not in finished:  # kept runs only
            finished[row.name] = _row_summary(row, runs)
    _set_rows(report, finished, started)
    report["targets"] = check_targets(report)
    report["estimate_full_seconds"] = estimate_full_seconds(report)
    atomic_write_text(folder / "quality.json", json.dumps(report, indent=2))
    plot_quality(out / "quality.png", report)
    return report


def _row_summary(row: Row, runs: list[dict]) -> dict:
    mean, std = _summary(runs)
    return {"name": row.name, "kind": row.kind, "label": row.label, "epsilon": row.epsilon, "n": len(runs), "mean": mean,
            "std": std, "seconds_per_run": statistics.fmean(r["seconds"] for r in runs), "runs": runs}


def _set_rows(report: dict, finished: dict[str, dict], started: float) -> None:
    """The report's rows so far, in table order, and its seconds."""
    order = [r.name for r in all_rows(report["settings"]["epsilons"])]
    report["rows"] = sorted(finished.values(), key=lambda r: order.index(r["name"]))
    report["seconds"] = time.perf_counter() - started


def _earlier_runs(path: Path, fingerprint: dict, *, resume: bool, log, flag: str = "--resume") -> dict[str, dict[int, dict]]:
    """The runs of an earlier quality.json, by row and seed, when resuming; otherwise it is set aside.
    ``flag`` names the option that brought the table in, for the messages."""
    if not path.exists():
        if resume:
            log(f"quality: --resume: no {path} yet, starting the table")
        return {}
    if not resume:
        aside = path.with_name(f"quality-previous-{time.strftime('%Y%m%d-%H%M%S')}.json")
        path.replace(aside)
        log(f"quality: the earlier {path.name} is now {aside.name} (pass --resume to continue it instead)")
        return {}
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        stored, rows = earlier["config"], earlier["rows"]
        runs = {r["name"]: {int(run["seed"]): run for run in r["runs"]} for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        advice = ("pass another --out, or move it away to start the table again" if flag == "--resume"
                  else "pass a quality.json that `hierfed bench --suite quality` wrote")
        raise DataError(f"{flag}: {path} is unreadable or from an older hierfed ({exc!r}); {advice}") from None
    defaults = _default_flat()
    for key in sorted(set(stored) | set(fingerprint)):
        # a key newer than the earlier table is the same setting at its default (what the code before it did)
        earlier = stored.get(key, defaults.get(key))
        if earlier != fingerprint.get(key):
            advice = "or pass another --out" if flag == "--resume" else "or leave that table out"
            raise ConfigError(f"{flag}: {path} was made with {key}={earlier!r}, this run has "
                              f"{fingerprint.get(key)!r}; resume with the same settings, {advice}")
    log(f"quality: {flag}: {sum(map(len, runs.values()))} runs kept from {path}")
    return runs


def _default_flat() -> dict:
    """Every run config key at its default, in JSON's form."""
    from hiermodel.run_config import RunConfig

    return json.loads(json.dumps(RunConfig.from_flat({}).to_flat()))


def code_version() -> str | None:
    """The git commit of this source tree (with "-dirty" for uncommitted changes), or None outside a checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


_FED_KEYS = {"fed.strategy", "fed.local-epochs", "fed.fraction-train", "fed.fraction-evaluate", "fed.min-nodes",
             "fed.round-timeout", "fed.proximal-mu", "fed.server-lr", "fed.trim-beta", "fed.personal-lambda",
             "fed.evaluate-split"}  # not the run folders: prepare_run sets those per run


def _row(report: dict, name: str) -> dict | None:
    return next((r for r in report["rows"] if r["name"] == name), None)


def check_targets(report: dict) -> list[dict]:
    """The quality issue's goals, each with its value, threshold, met (None: a row it needs was not run) and
    what bounds it (measured context, not a verdict)."""
    central, fed = _row(report, "central"), _row(report, "fed-nodp")
    ppop, gbdt = _row(report, "ppop"), _row(report, "gbdt")
    on_retail = report["data"]["name"] == "online-retail"
    out = []

    def add(name, text, value, threshold, limit, *, absolute=False):
        met = None if value is None else bool(value >= threshold)
        out.append({"name": name, "goal": text, "value": value, "threshold": threshold, "met": met,
                    "limit": limit if met is False else "",
                    "applies": on_retail or not absolute})  # absolute levels are set for Online Retail

    def mean(row, metric="ndcg@10"):
        return None if row is None else row["mean"][metric]

    context = []
    if central and ppop:
        context.append(f"P-Pop alone {mean(ppop):.3f} (model = {mean(central) / max(mean(ppop), 1e-12):.3f} × P-Pop)")
    if central and gbdt:
        context.append(f"gbdt {mean(gbdt):.3f}")
    if central:
        context.append(f"early-stopped at epoch {statistics.fmean(r['best_epoch'] for r in central['runs']):.1f} of "
                       f"≤ {report['settings']['epochs']}")
    add("centralized NDCG@10", "centralized NDCG@10 ≥ 0.32", mean(central), 0.32, "; ".join(context), absolute=True)
    add("centralized explore-R@20", "centralized explore-Recall@20 ≥ 0.09", mean(central, "explore_recall@20"), 0.09,
        "; ".join(context), absolute=True)
    rounds = report["settings"]["rounds"]
    ratio = None if not (central and fed) else mean(fed) / max(mean(central), 1e-12)
    best = f" (best epoch {statistics.fmean(r['best_epoch'] for r in central['runs']):.1f})" if central else ""
    add("federated / centralized", "federated non-DP NDCG@10 ≥ 0.97 × centralized", ratio, 0.97,
        f"{_plural(rounds, 'federated round')} of {_plural(report['settings'].get('local_epochs', 1), 'local epoch')} against ≤ {_plural(report['settings']['epochs'], 'epoch')} "
        f"centralized{best}")
    for eps, threshold in ((8.0, 0.95), (4.0, None), (1.0, 0.85)):
        dp = _row(report, f"fed-dp{eps:g}")
        if dp is None and threshold is None:
            continue
        ratio = None if not (dp and fed) else mean(dp) / max(mean(fed), 1e-12)
        sigma = [r["noise_multiplier_range"] for r in dp["runs"] if r.get("noise_multiplier_range")] if dp else []
        limit = ("under user-level DP the sites read popularity from a noisy weekly release and train on one target "
                 "basket per sampled user per step, each clipped" + (f"; σ {min(s[0] for s in sigma):.2f}–{max(s[1] for s in sigma):.2f}" if sigma else ""))
        if threshold is None:  # ε = 4: the issue sets no goal, only the ratio is shown
            out.append({"name": "DP ε=4 / non-DP", "goal": "DP ε = 4 (no goal; between ε = 8 and ε = 1)", "value": ratio,
                        "threshold": None, "met": None, "limit": "", "applies": True})
            continue
        add(f"DP ε={eps:g} / non-DP", f"DP ε = {eps:g} NDCG@10 ≥ {threshold} × federated non-DP", ratio, threshold, limit)
    return out


def estimate_full_seconds(report: dict) -> float | None:
    """The measured mean seconds per run of each row kind × every row of that kind × FULL_SEEDS (baselines once)
    at this run's epochs and rounds: an estimate of the full suite, not a measurement."""
    per_kind: dict[str, list[float]] = {}
    for r in report["rows"]:
        per_kind.setdefault("central" if r["kind"] in ("centralized", "ablation") else r["kind"], []).append(r["seconds_per_run"])
    total = 0.0
    for row in all_rows(report["settings"]["epsilons"]):
        kind = "central" if row.kind in ("centralized", "ablation") else row.kind
        measured = next((r["seconds_per_run"] for r in report["rows"] if r["name"] == row.name), None)
        if measured is None and per_kind.get(kind):
            measured = statistics.fmean(per_kind[kind])
        if measured is None:
            return None  # a kind never run: no basis for an estimate (and JSON has no NaN)
        total += measured * (1 if row.kind == "baseline" else FULL_SEEDS)
    return total


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _cell(row: dict, metric: str) -> str:
    mean, std = row["mean"][metric], row["std"][metric]
    return f"{mean:.3f}" if row["kind"] == "baseline" else f"{mean:.3f} ± {std:.3f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a (a row kind was not run)"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def quality_markdown(q: dict) -> list[str]:
    """The quality section of bench.md."""
    s = q["settings"]
    seeds = len(s["seeds"])
    lines = [f"### Quality on {q['data']['name']} ({q['data']['users']:,} users, {q['data']['items']:,} items)", "",
             f"Trained rows: mean ± std over {seeds} seed{'s' if seeds > 1 else ''} ({', '.join(map(str, s['seeds']))}); "
             f"centralized ≤ {_plural(s['epochs'], 'epoch')} (early stopping, patience {s['patience']}); federated "
             f"{_plural(s['rounds'], 'round')}, one site per data site, the server's test evaluation after the last round. "
             "Baselines are deterministic (one run).", "",
             "| row | NDCG@10 | Recall@10 | Recall@20 | MRR | explore-R@20 | runs | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        lines.append(f"| {r['label']} | " + " | ".join(_cell(r, m) for m in METRICS)
                     + f" | {r['n']} | {r['seconds_per_run']:.0f} |")
    lines += ["", "| goal | value | status | what bounds it |", "|---|---|---|---|"]
    for t in q["targets"]:
        value = "not run" if t["value"] is None else f"{t['value']:.3f}"
        if t["met"] is None:
            status = "—" if t["threshold"] is None else "not measured"
        else:
            status = "met" if t["met"] else "**NOT met**"
        if not t["applies"]:
            status += " (the level is set for Online Retail: informative only here)"
        lines.append(f"| {t['goal']} | {value} | {status} | {t['limit']} |")
    runs = sum(r["n"] for r in q["rows"])
    run_seconds = sum(r["seconds_per_run"] * r["n"] for r in q["rows"])
    lines += ["", f"Quality suite: {len(q['rows'])} rows, {runs} runs taking {_duration(run_seconds)} in all "
              f"({_duration(q['seconds'])} in this invocation; `--resume` keeps earlier runs). "
              f"All {len(all_rows(s['epsilons']))} rows × {FULL_SEEDS} seeds at these epochs and rounds: "
              f"**estimate** {_duration(q['estimate_full_seconds'])} (the measured seconds per run of each row kind × its "
              "rows × seeds; not a measurement).", ""]
    return lines


def plot_quality(path: Path, q: dict) -> Path:
    """NDCG@10 per row, with ± std error bars for the trained rows."""
    from hiermodel.plots import plt  # the headless backend is set there

    rows = q["rows"]
    colours = {"baseline": "#999999", "centralized": "#1f77b4", "federated": "#2ca02c", "ablation": "#ff7f0e"}
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r["mean"]["ndcg@10"] for r in rows], xerr=[r["std"]["ndcg@10"] for r in rows],
            color=[colours[r["kind"]] for r in rows], capsize=3)
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=7)
    ax.set_xlabel("test NDCG@10 (mean ± std over seeds)")
    ax.set_title(f"quality on {q['data']['name']}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# the smoke check of `hierfed bench --quick`: a small model on small synthetic data, one seed, one epoch / round
QUICK = {"seeds": 1, "epochs": 1, "rounds": 1, "synthetic_users": 160}
QUICK_MODEL = {"dim": 16, "max_history_items": 16, "max_baskets": 4, "scorer_hidden": 16}


def quality_settings(*, quick: bool, overrides: dict, seeds: int | None = None, epochs: int | None = None,
                     rounds: int | None = None, rows: str = "", resume: bool = False,
                     resume_from: tuple[Path, ...] = ()) -> QualitySettings:
    """The suite's settings from the bench flags; train.* / fed.* / dp.* of --run-config apply to every run."""
    from hiermodel.run_config import apply_group

    for name, value in (("--seeds", seeds), ("--epochs", epochs), ("--rounds", rounds)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    select_rows(rows)  # an unknown row is one line before any work
    for table in resume_from:
        if not table.is_file():
            raise ConfigError(f"--resume-from {table}: no such file; pass a quality.json that `hierfed bench --suite quality` wrote")
    base = QualitySettings(**QUICK) if quick else QualitySettings()
    return dataclasses.replace(
        base,
        seeds=seeds or base.seeds,
        epochs=epochs or base.epochs,
        rounds=rounds or base.rounds,
        rows=rows,
        resume=resume,
        resume_from=tuple(resume_from),
        train=apply_group(TrainConfig(), "train", overrides),
        fed=apply_group(FedConfig(), "fed", overrides),
        dp=apply_group(DPConfig(), "dp", overrides),
        quick=quick,
        # a size given in --run-config wins over the quick default
        synthetic_users=None if "data.synthetic-users" in overrides else base.synthetic_users,
        model_changes={k: v for k, v in QUICK_MODEL.items() if f"model.{k.replace('_', '-')}" not in overrides} if quick else {},
    )
