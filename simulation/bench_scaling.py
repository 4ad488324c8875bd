"""The scaling suite of `hierfed bench`: whole federated simulations (DP on, as in the product) at
growing numbers of simulated sites and history lengths, with the wall time per round, peak memory
and where each round's time goes.

Points (`FULL_POINTS`): Online Retail at 4 sites (the 3 largest countries + the rest grouped) and
37 (one site per country); a synthetic data set the size of Online Retail (users, items) with 37
and 200 sites. History × k multiplies the history the model sees (`model.max-history-items` and
`model.max-baskets`, to which every batch is padded) by k; on synthetic data every user also has
k × as many baskets (`mean_baskets` × k), so the longer window is filled with real purchases. Real
Online Retail histories cannot be lengthened faithfully (repeating a user's baskets would invent
purchases), so there only the window grows and users with long histories fill it; the mean history
the model actually sees is reported beside every point.

Time per round comes from results.json (`rounds[*].time`): sites run `concurrency` at a time
(cores / cpus per site), so training is max(slowest site, sum of site training / concurrency);
framework overhead is what remains of the round's wall time after training, aggregation and the
server's evaluation (Flower messaging, Ray scheduling, site start-up). Federated evaluation at the
sites is off (`fed.fraction-evaluate=0`), so it does not hide in that remainder. Round 1 also
starts every Ray worker (imports, first site builds) and is reported apart from the mean of the
later rounds.

Memory is sampled from /proc every `sample_seconds` over the process tree of this process: the
driver (ServerApp, Ray's driver, the Flower simulation) and the Ray worker processes (where sites
train). RSS counts shared pages (torch's libraries, the memory-mapped encoding cache) in every
process that touches them, so the sum over workers is an upper bound on what they add together.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hiermodel.data.synthetic import SyntheticConfig, generate_synthetic
from hiermodel.errors import ConfigError, DataError
from hiermodel.jobs import write_json
from hiermodel.run_config import RunConfig, Scalar

COMPONENTS = ("site_training", "aggregation", "server_evaluation", "framework_overhead")


@dataclass(frozen=True)
class ScalingPoint:
    name: str
    data: str  # "online-retail" or "synthetic"
    sites: int
    history: int = 1  # factor on the history window (and, for synthetic data, on the baskets per user)


FULL_POINTS = (  # run in this order: the 4 → 37 → 200 first, in case the run has to stop early
    ScalingPoint("retail-4", "online-retail", 4),
    ScalingPoint("retail-37", "online-retail", 37),
    ScalingPoint("synthetic-200", "synthetic", 200),
    ScalingPoint("retail-37-h4", "online-retail", 37, 4),
    ScalingPoint("synthetic-200-h4", "synthetic", 200, 4),
    ScalingPoint("synthetic-37", "synthetic", 37),
)
QUICK_POINTS = (  # three simulations: Ray and worker start-up (~20 s each on 2 busy cores) is most of the time
    ScalingPoint("synthetic-2", "synthetic", 2),
    ScalingPoint("synthetic-8", "synthetic", 8),
    ScalingPoint("synthetic-8-h4", "synthetic", 8, 4),
)
# Online Retail's size under our protocol (4,334 users, 3,659 items): the synthetic points match it
RETAIL_SIZED = SyntheticConfig(num_users=4334, num_topics=12, subtopics_per_topic=6, items_per_subtopic=51)
QUICK_SYNTHETIC = SyntheticConfig(num_users=160)
QUICK_MODEL = {"model.dim": 16, "model.max-history-items": 16, "model.max-baskets": 4, "model.scorer-hidden": 16}


@dataclass
class ScalingSettings:
    points: tuple[ScalingPoint, ...] = FULL_POINTS
    run: tuple[str, ...] = ()  # names of the points to run (empty: all); the rest are listed as not measured
    rounds: int = 2
    synthetic: SyntheticConfig = RETAIL_SIZED
    overrides: dict[str, Scalar] = field(default_factory=dict)  # run config keys for every point (model.*, data.*, dp.*)
    cpus_per_site: float = 1.0
    sample_seconds: float = 0.5


def scaling_settings(*, quick: bool, overrides: dict[str, Scalar], points: str = "", rounds: int | None = None) -> ScalingSettings:
    """The suite's points and sizes: --quick is tiny synthetic data and a small model."""
    base = ScalingSettings(points=QUICK_POINTS, synthetic=QUICK_SYNTHETIC, overrides={**QUICK_MODEL, **overrides}) if quick \
        else ScalingSettings(overrides=dict(overrides))
    sizes = {"num_users": overrides.get("data.synthetic-users"), "seed": overrides.get("data.synthetic-seed")}
    base = dataclasses.replace(base, synthetic=dataclasses.replace(base.synthetic, **{k: int(v) for k, v in sizes.items() if v is not None}))
    names = tuple(p.strip() for p in points.split(",") if p.strip())
    unknown = [n for n in names if n not in {p.name for p in base.points}]
    if unknown:
        raise ConfigError(f"unknown scaling point {unknown[0]!r}; valid: {', '.join(p.name for p in base.points)}")
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    return dataclasses.replace(base, run=names, rounds=rounds or base.rounds)


# --- memory -------------------------------------------------------------------------------------


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited while we looked
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_ray_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return cmd.startswith(b"ray::") or b"default_worker.py" in cmd


class MemorySampler(threading.Thread):
    """Peak RSS of this process and of the Ray workers below it, sampled from /proc."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.driver_start = 0  # the driver's RSS before the point: earlier points of the same bench run leave memory behind
        self.driver_peak = 0
        self.workers_sum_peak = 0  # the largest sum of the workers' current RSS at one sample
        self.worker_hwm: dict[int, int] = {}  # each worker's own peak (VmHWM), last seen
        self.samples = 0
        self.load = 0.0  # the 1-minute load average summed over samples: others' jobs share the cores

    def sample(self) -> None:
        me = os.getpid()
        rss = _status_kib(me).get("VmRSS", 0)
        self.driver_start = self.driver_start or rss
        self.driver_peak = max(self.driver_peak, rss)
        total = 0
        for pid in _descendants(me):
            if pid in self.worker_hwm or _is_ray_worker(pid):
                try:
                    status = _status_kib(pid)
                except OSError:
                    continue
                total += status.get("VmRSS", 0)
                self.worker_hwm[pid] = max(self.worker_hwm.get(pid, 0), status.get("VmHWM", 0))
        self.workers_sum_peak = max(self.workers_sum_peak, total)
        self.samples += 1
        self.load += os.getloadavg()[0]

    def run(self) -> None:
        self.sample()
        while not self.stopped.wait(self.interval):
            self.sample()

    def stop(self) -> dict:
        self.stopped.set()
        self.join()
        self.sample()
        mib = 1 / 1024
        return {
            "driver_start_rss_mib": self.driver_start * mib,
            "driver_peak_rss_mib": self.driver_peak * mib,
            "driver_added_mib": (self.driver_peak - self.driver_start) * mib,
            "workers": len(self.worker_hwm),
            "worker_peak_rss_mib": max(self.worker_hwm.values(), default=0) * mib,
            "workers_sum_peak_rss_mib": self.workers_sum_peak * mib,
            "samples": self.samples,
            "load_average": self.load / max(self.samples, 1),
        }


# --- one point ----------------------------------------------------------------------------------


def _history_seen(dataset, *, max_items: int, max_baskets: int) -> dict[str, float]:
    """What the model sees for each user's test basket: distinct earlier items and earlier baskets, capped."""
    items, baskets = [], []
    for user in dataset.users:
        earlier = user.baskets[:-1]
        if not earlier:
            continue
        distinct = {int(i) for b in earlier for i in b.items.tolist()}
        items.append(min(len(distinct), max_items))
        baskets.append(min(len(earlier), max_baskets))
    return {"mean_history_items": sum(items) / max(len(items), 1), "mean_history_baskets": sum(baskets) / max(len(baskets), 1),
            "max_history_items": max_items, "max_baskets": max_baskets}


def _point_config(point: ScalingPoint, settings: ScalingSettings, out: Path) -> tuple[dict[str, Scalar], str, int | None]:
    """The point's flat run config, its partitioning and number of clients."""
    flat = dict(settings.overrides)
    base = RunConfig.from_flat({k: v for k, v in flat.items() if k.startswith("model.")}).model
    flat.update({
        "fed.rounds": settings.rounds, "fed.fraction-evaluate": 0.0,
        "model.max-history-items": base.max_history_items * point.history, "model.max-baskets": base.max_baskets * point.history,
    })
    if point.data == "online-retail":
        flat["data.dataset"] = "online-retail"
        # natural: one site per country; fewer: the largest countries and one site for the rest
        return flat, "natural", None if point.sites == 37 else point.sites
    if point.data != "synthetic":
        raise ConfigError(f"scaling point {point.name}: unknown data {point.data!r}")
    synthetic = dataclasses.replace(settings.synthetic, num_sites=point.sites,
                                    mean_baskets=settings.synthetic.mean_baskets * point.history)
    folder = out / "data" / f"synthetic-{point.sites}-h{point.history}"
    if not (folder / "meta.json").is_file():
        from hiermodel.data.store import save_dataset

        save_dataset(generate_synthetic(synthetic), folder)
    flat["data.dataset"] = str(folder.resolve())
    return flat, "natural", None


def _round_split(row: dict, concurrency: int) -> dict[str, float]:
    t = row["time"]
    training = max(t["site_training_max"], t["site_training_sum"] / concurrency)
    return {
        "wall": row["wall_seconds"],
        "site_training": training,
        "aggregation": t["aggregation"],
        "server_evaluation": t["server_evaluation"],
        "framework_overhead": max(row["wall_seconds"] - training - t["aggregation"] - t["server_evaluation"], 0.0),
        "site_training_sum": t["site_training_sum"],
        "site_training_max": t["site_training_max"],
    }


def run_point(point: ScalingPoint, settings: ScalingSettings, out: Path, *, log=print) -> dict:
    from simulation.run import prepare_run, simulate

    folder = out / point.name
    started = time.perf_counter()
    flat, partition, clients = _point_config(point, settings, out)
    config, sites, encoding = prepare_run(RunConfig.from_flat(flat), out=folder, partition=partition, num_clients=clients, log=log)
    from hiermodel.data.store import load_dataset_folder

    dataset = load_dataset_folder(Path(config.fed.server_eval_data))  # prepare_run's copy of the whole set: no second parse
    seen = _history_seen(dataset, max_items=config.model.max_history_items, max_baskets=config.model.max_baskets)
    prepared = time.perf_counter() - started
    sampler = MemorySampler(settings.sample_seconds)
    sampler.start()
    try:
        results = simulate(config, num_sites=sites, cpus_per_site=settings.cpus_per_site, encoding_seconds=encoding, log=log)
    finally:
        memory = sampler.stop()
    concurrency = max(1, min(sites, int((os.cpu_count() or 1) // settings.cpus_per_site)))
    rounds = [_round_split(r, concurrency) for r in results["rounds"]]
    steady = rounds[1:] or rounds  # round 1 starts the workers; one round alone is all there is
    mean = {k: sum(r[k] for r in steady) / len(steady) for k in rounds[0]}
    rounds_wall = sum(r["wall"] for r in rounds)
    sim = results["simulation"]
    report = {
        "name": point.name, "data": point.data, "sites": sites, "history": point.history,
        "users": len(dataset.users), "items": dataset.num_items, "baskets": sum(len(u.baskets) for u in dataset.users),
        **seen,
        "dp": config.dp.enabled, "rounds": len(rounds), "concurrency": concurrency,
        "round_seconds": mean["wall"],
        "round_seconds_from": "rounds 2+" if len(rounds) > 1 else "round 1 (includes worker start-up)",
        "first_round_seconds": rounds[0]["wall"],
        "split": {k: mean[k] for k in (*COMPONENTS, "site_training_sum", "site_training_max")},
        "per_round": rounds,
        "encoding_seconds": encoding,
        "prepare_seconds": prepared,
        "ray_startup_shutdown_seconds": sim["startup_and_shutdown_seconds"],
        "server_setup_seconds": max(results["wall_seconds"] - rounds_wall, 0.0),  # initial state and round-0 evaluation
        "wall_seconds": sim["wall_seconds"],
        "memory": memory,
    }
    log(f"scaling {point.name}: {sites} sites, history ×{point.history}: {report['round_seconds']:.1f} s/round "
        f"(first {report['first_round_seconds']:.1f} s), driver {memory['driver_peak_rss_mib']:.0f} MiB, "
        f"workers {memory['workers_sum_peak_rss_mib']:.0f} MiB")
    return report


# --- the suite ----------------------------------------------------------------------------------


def _exponent(a: float, b: float, ratio: float) -> float | None:
    """k in cost ∝ x^k between two points (None where a cost is zero)."""
    if a <= 0 or b <= 0 or ratio == 1:
        return None
    return math.log(b / a) / math.log(ratio)


def _growth(a: dict, b: dict, axis: str) -> dict:
    ratio = b[axis] / a[axis]
    costs = {"round": (a["round_seconds"], b["round_seconds"]),
             **{k: (a["split"][k], b["split"][k]) for k in COMPONENTS},
             "driver_memory": (a["memory"]["driver_added_mib"], b["memory"]["driver_added_mib"]),
             "workers_memory": (a["memory"]["workers_sum_peak_rss_mib"], b["memory"]["workers_sum_peak_rss_mib"])}
    out = {"from": a["name"], "to": b["name"], "axis": axis, "ratio": ratio, "costs": {}}
    for name, (x, y) in costs.items():
        out["costs"][name] = {"from": x, "to": y, "ratio": y / x if x > 0 else None, "exponent": _exponent(x, y, ratio)}
    if axis == "sites":
        out["driver_mib_per_added_site"] = (costs["driver_memory"][1] - costs["driver_memory"][0]) / (b["sites"] - a["sites"])
    return out


def growth(points: list[dict]) -> list[dict]:
    """Growth between measured points: sites (same data, history ×1) and history (same data and sites)."""
    out = []
    for data in sorted({p["data"] for p in points}):
        series = sorted((p for p in points if p["data"] == data and p["history"] == 1), key=lambda p: p["sites"])
        out += [_growth(a, b, "sites") for a, b in zip(series, series[1:]) if b["sites"] != a["sites"]]
        for p in points:
            base = next((q for q in series if q["sites"] == p["sites"]), None)
            if p["data"] == data and p["history"] != 1 and base is not None:
                out.append(_growth(base, p, "history"))
    return out


def scaling_suite(settings: ScalingSettings, out: Path, *, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    measured, skipped = [], []
    for point in settings.points:
        if settings.run and point.name not in settings.run:
            skipped.append({"name": point.name, "data": point.data, "sites": point.sites, "history": point.history,
                            "reason": "not selected in this run"})
            continue
        try:
            measured.append(run_point(point, settings, out, log=log))
            # a long run keeps what it measured so far, should it be stopped
            write_json(out / "partial.json", {"points": measured, "not_measured": skipped})
        except DataError as exc:  # e.g. no Online Retail file on this machine: say so, measure the rest
            log(f"scaling {point.name}: not measured ({exc})")
            skipped.append({"name": point.name, "data": point.data, "sites": point.sites, "history": point.history,
                            "reason": str(exc)})
    return {"rounds_per_point": settings.rounds, "cpus_per_site": settings.cpus_per_site,
            "settings": {k: v for k, v in settings.overrides.items()}, "synthetic": dataclasses.asdict(settings.synthetic),
            "points": measured, "not_measured": skipped, "growth": growth(measured)}


def _kind(exponent: float | None) -> str:
    if exponent is None:
        return "n/a"
    if exponent < -0.2:
        return "falls"
    if exponent < 0.2:
        return "about flat"
    if exponent < 0.8:
        return "sublinear"
    if exponent <= 1.2:
        return "about linear"
    return "superlinear"


def _sentence(g: dict) -> str:
    axis = "sites" if g["axis"] == "sites" else "history length"
    parts = []
    for name, c in g["costs"].items():
        if c["ratio"] is None:
            continue
        exp = "" if c["exponent"] is None else f", exponent {c['exponent']:.2f}: {_kind(c['exponent'])}"
        unit = "MiB" if name.endswith("memory") else "s"
        parts.append(f"{name.replace('_', ' ')} {c['from']:.1f} → {c['to']:.1f} {unit} (× {c['ratio']:.2f}{exp})")
    extra = f"; the driver's own increase grows by {g['driver_mib_per_added_site']:.2f} MiB per added site" if "driver_mib_per_added_site" in g else ""
    return f"- {g['from']} → {g['to']} ({axis} × {g['ratio']:.2f}): " + "; ".join(parts) + extra + "."


def _load(memory: dict) -> str:
    return f"{memory['load_average']:.1f}" if "load_average" in memory else "–"  # reports written before it was sampled


def markdown(report: dict) -> list[str]:
    s = report
    lines = [f"Scaling (whole simulations, DP-SGD on, {s['rounds_per_point']} rounds per point, federated evaluation off, "
             f"server evaluation on; time per round = mean over rounds 2+, round 1 apart):", "",
             "| point | sites | history (× / mean items / baskets seen) | users | round (s) | round 1 (s) | training | aggregation "
             "| server eval | framework | encoding (s) | Ray start+stop (s) | driver peak (MiB, + during the point) | workers peak (MiB) "
             "| load average |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(s["points"], key=lambda p: (p["data"], p["history"], p["sites"])):
        sp, m = p["split"], p["memory"]
        lines.append(
            f"| {p['name']} | {p['sites']} | ×{p['history']} / {p['mean_history_items']:.0f} / {p['mean_history_baskets']:.1f} "
            f"| {p['users']:,} | {p['round_seconds']:.1f} | {p['first_round_seconds']:.1f} | {sp['site_training']:.1f} "
            f"| {sp['aggregation']:.2f} | {sp['server_evaluation']:.1f} | {sp['framework_overhead']:.1f} | {p['encoding_seconds']:.1f} "
            f"| {p['ray_startup_shutdown_seconds']:.1f} | {m['driver_peak_rss_mib']:.0f} (+{m['driver_added_mib']:.0f}) | {m['workers_sum_peak_rss_mib']:.0f} "
            f"({m['workers']} workers, largest {m['worker_peak_rss_mib']:.0f}) | {_load(m)} |")
    for p in s["not_measured"]:
        lines.append(f"| {p['name']} | {p['sites']} | ×{p['history']} | not measured: {p['reason']} |" + " |" * 11)
    lines += ["", "Time columns are seconds per round. Training = max(slowest site, sum over sites / the sites run at once); "
              "framework = the rest of the round (Flower messaging, Ray scheduling, building each site in its worker). "
              "Memory, sampled from /proc: driver = this process (ServerApp, Flower's simulation, Ray's driver), its peak RSS "
              "and its increase during the point; workers = the largest sum of the Ray worker processes' RSS at one sample "
              "(an upper bound: shared pages count in each), how many there were, and the largest one's own peak.",
              "", "How each cost grows (exponent k in cost ∝ x^k between the two points):", ""]
    lines += [_sentence(g) for g in s["growth"]] or ["- fewer than two comparable points were measured."]
    return lines + [""]


def plot(path: Path, report: dict) -> Path:
    """Stacked time per round by component: against sites (history ×1) and against history length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    groups = {"time per round vs sites (history ×1)": [p for p in points if p["history"] == 1],
              "time per round vs history length": [p for p in points
                                                   if any(q["sites"] == p["sites"] and q["data"] == p["data"] and q["history"] != 1
                                                          for q in points)]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    for ax, (title, group) in zip(axes[0], groups.items()):
        group = sorted(group, key=lambda p: (p["data"], p["sites"], p["history"]))
        labels = [f"{p['data'].split('-')[-1]}\n{p['sites']} sites ×{p['history']}" for p in group]
        bottom = [0.0] * len(group)
        for component in COMPONENTS:
            values = [p["split"][component] for p in group]
            ax.bar(range(len(group)), values, bottom=bottom, label=component.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(len(group)), labels, fontsize=7)
        ax.set_ylabel("seconds per round")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
