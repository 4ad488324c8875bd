"""`hierfed audit`: recompute every site's ε from a run's privacy ledger with an independent
accountant (Google's dp_accounting: PLD by default, or RDP) and check it against what the sites
reported, against their budgets, and for gaps in the ledger.

Central DP's record (Flower's RDP accountant, which is dp_accounting's) is recomputed by Opacus'
RDP analysis instead: the same bound by another implementation."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hiermodel.errors import ConfigError, DataError
from server.ledger import CENTRAL_SITE, EPSILON_PLOT, GENESIS, LEDGER_FILE, LEGACY_DIGEST, read_ledger, round_digest

DEFAULT_TOLERANCE = 0.02
# Accepted on top of the relative tolerance: Opacus' PRV accountant reports the upper end of its
# estimate, 0.01 (its eps_error) above it, which alone is over 2% of an ε below 0.5 (a first round).
ABS_TOLERANCE = 0.01
# Discretisation of the privacy loss (pessimistic: ε only rounds up). The error grows with the steps
# composed and the square of the interval: up to 2000 steps, 1e-3 stays within 0.15% of a 10× finer
# (10× slower) PLD, where 2e-3 drifts by 0.5% and 3e-3 by up to 2%.
PLD_INTERVAL = 1e-3
AUDIT_ACCOUNTANTS = ("pld", "rdp")
PARALLEL_SITES = 16  # from this many sites the recomputation is spread over processes
# which accountant compares like with like for the accountant a site used
_COUNTERPART = {"prv": "pld", "rdp": "rdp"}
# accountants whose records are always recomputed by one implementation (not the --accountant chosen)
_FIXED_COUNTERPART = {"flower-rdp": "opacus-rdp"}
# Opacus' default RDP orders, and higher ones for the few, heavily noised releases of central DP
OPACUS_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512, 1024])

# one record's mechanisms: (sample rate q, noise multiplier σ, steps, δ), optionally followed by
# (σ of the popularity release, releases first recorded in this record)
Round = tuple[float, ...]


# -- independent accounting ---------------------------------------------------------------------

@functools.lru_cache(maxsize=64)  # a site's rounds come one after another; bounded, as PLDs are large
def _round_pld(q: float, sigma: float, steps: int, interval: float):  # q = 1: the popularity release
    """The PLD of one round: what PLDAccountant composes for
    SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps), built directly so
    that it is cached (sites keep q, σ and steps from round to round)."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma,
        sampling_prob=q,
        value_discretization_interval=interval,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
    ).self_compose(steps)


class _PldComposer:
    """One site's privacy loss distribution, each trained round composed onto the rounds before."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.pld = None

    def add(self, q: float, sigma: float, steps: int) -> None:
        this_round = _round_pld(q, sigma, steps, self.interval)
        self.pld = this_round if self.pld is None else self.pld.compose(this_round)

    def epsilon(self, delta: float) -> float:
        return self.pld.get_epsilon_for_delta(delta)


@functools.lru_cache(maxsize=1024)
def _step_rdp(q: float, sigma: float):
    """Orders and RDP of one DP-SGD step, by RdpAccountant (a round of n steps is n times this)."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    with _quiet_absl():
        accountant.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)))
    return accountant.orders, accountant.rdp


class _RdpComposer:
    """One site's RDP curve, summed over its trained rounds."""

    def __init__(self, interval: float) -> None:
        self.orders, self.rdp = None, 0.0

    def add(self, q: float, sigma: float, steps: int) -> None:
        self.orders, rdp = _step_rdp(q, sigma)
        self.rdp = self.rdp + steps * rdp

    def epsilon(self, delta: float) -> float:
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        with _quiet_absl():
            return compute_epsilon(self.orders, self.rdp, delta)[0]


class _OpacusRdpComposer:
    """Opacus' RDP analysis of the sampled Gaussian mechanism, summed over the rounds."""

    def __init__(self, interval: float) -> None:
        self.rdp = 0.0

    def add(self, q: float, sigma: float, steps: int) -> None:
        from opacus.accountants.analysis.rdp import compute_rdp

        self.rdp = self.rdp + compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(OPACUS_ORDERS))

    def epsilon(self, delta: float) -> float:
        from opacus.accountants.analysis.rdp import get_privacy_spent

        return float(get_privacy_spent(orders=list(OPACUS_ORDERS), rdp=self.rdp, delta=delta)[0])


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp_accounting's RDP logs a warning per fractional order it cannot evaluate (and then skips)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_COMPOSERS = {"pld": _PldComposer, "rdp": _RdpComposer, "opacus-rdp": _OpacusRdpComposer}


def epsilon_series(rounds: Sequence[Round], *, accountant: str = "pld", interval: float | None = None) -> list[float]:
    """ε after each of one site's rounds (q, σ, steps, δ[, release σ, new releases]; 0 steps for a
    declined round), composed round by round by dp_accounting's PLD (discretised at ``interval``,
    default PLD_INTERVAL) or RDP."""
    composer = _COMPOSERS[accountant](interval or PLD_INTERVAL)
    series: list[float] = []
    composed = infinite = False
    for i, (q, sigma, steps, delta, *release) in enumerate(rounds):
        release_sigma, releases = release if release else (0.0, 0)
        if (steps > 0 and sigma == 0) or (releases > 0 and release_sigma == 0):
            infinite = True  # no noise: not private at all
        else:
            if releases > 0:
                composer.add(1.0, float(release_sigma), int(releases))  # a Gaussian on every user at once: q = 1
            if steps > 0:
                composer.add(float(q), float(sigma), int(steps))
            composed = composed or steps > 0 or releases > 0
        if infinite or not composed:
            series.append(math.inf if infinite else 0.0)
        elif steps > 0 or releases > 0 or delta != rounds[i - 1][3]:
            series.append(float(composer.epsilon(delta)))
        else:
            series.append(series[-1])  # a declined round spends nothing
    return series


def recompute_epsilon(
    rounds: Sequence[tuple[float, float, int]], delta: float, *, accountant: str = "pld", interval: float | None = None
) -> float:
    """ε at δ after DP-SGD rounds (q, σ, steps), as epsilon_series composes them."""
    if not rounds:
        return 0.0
    return epsilon_series([(q, s, n, delta) for q, s, n in rounds], accountant=accountant, interval=interval)[-1]


def _site_series(rounds: list[Round], accountant: str) -> list[float]:
    return epsilon_series(rounds, accountant=accountant, interval=PLD_INTERVAL)


def _series_by_site(rounds: list[list[Round]], *, accountants: list[str], workers: int | None) -> list[list[float]]:
    """epsilon_series of every site (by its own accountant); sites are independent, so many of them
    go to forked workers."""
    if workers is None:
        workers = min(len(rounds), len(os.sched_getaffinity(0))) if len(rounds) >= PARALLEL_SITES else 1
    if workers <= 1 or not _can_fork():
        return [_site_series(r, a) for r, a in zip(rounds, accountants)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_site_series, rounds, accountants, chunksize=max(1, len(rounds) // (8 * workers))))


def _can_fork() -> bool:
    # fork starts workers at once and needs no __main__ guard in callers' scripts, but is safe
    # only while this process runs no other thread (a server calling the audit may)
    return sys.platform == "linux" and threading.active_count() == 1


# -- the report ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Finding:
    kind: str  # mismatch | overspend | gap | inconsistent
    site: str | None
    round: int | None
    message: str


@dataclasses.dataclass
class RoundEpsilon:
    round: int
    status: str
    reported: float
    recomputed: float


@dataclasses.dataclass
class SiteRow:
    site: str
    rounds_trained: int
    rounds_declined: int
    total_steps: int
    unreported_steps: int  # spent by the site in rounds whose reply the server never recorded
    sigma: tuple[float, float]  # lowest and highest σ of the trained rounds
    sample_rate: tuple[float, float]
    epsilon_reported: float
    epsilon_recomputed: float
    budget: float
    remaining: float
    ok: bool
    release_sigma: float = 0.0  # σ of the site's popularity release (0: it made none)


@dataclasses.dataclass
class AuditReport:
    ledger: str
    accountant: str
    tolerance: float
    abs_tolerance: float
    rounds: int
    sites: list[SiteRow]
    series: dict[str, list[RoundEpsilon]]
    findings: list[Finding]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.findings


class _Audit:
    """One pass over the ledger's records checking their sequence, then the ε of each site."""

    def __init__(self, *, accountant: str, tolerance: float, abs_tolerance: float) -> None:
        self.accountant = accountant
        self.tolerance = tolerance
        self.abs_tolerance = abs_tolerance
        self.sites: dict[str, list[dict]] = {}
        self.series: dict[str, list[RoundEpsilon]] = {}
        self.findings: list[Finding] = []
        self.open_rounds: dict[int, list[str]] = {}  # round -> sites whose records await its round record
        self.closed = 0  # the last round a round record closed
        self.round_records: dict[int, list[dict]] = {}  # round -> its site records, for the digest chain
        self.digest = GENESIS

    def flag(self, kind: str, message: str, *, site: str | None, server_round: int | None) -> None:
        self.findings.append(Finding(kind=kind, site=site, round=server_round, message=message))

    def flag_record(self, kind: str, record: dict, message: str) -> None:
        self.flag(kind, message, site=record["site"], server_round=record["round"])

    def site_record(self, record: dict) -> None:
        records = self.sites.setdefault(record["site"], [])
        self._check_sequence(record, records[-1] if records else None)
        records.append(record)
        self.open_rounds.setdefault(record["round"], []).append(record["site"])
        self.round_records.setdefault(record["round"], []).append(record)

    def _check_sequence(self, record: dict, previous: dict | None) -> None:
        seq, total, server_round = record["seq"], record["total_steps"], record["round"]
        last_seq, last_total = (previous["seq"], previous["total_steps"]) if previous else (0, 0)
        if seq != last_seq + 1:
            self.flag_record("gap", record, f"seq {seq} follows seq {last_seq}: "
                             f"{seq - last_seq - 1} record(s) of this site are missing or repeated")
        if total != last_total + record["steps"] + record["unreported_steps"]:
            self.flag_record("gap", record, f"total_steps {total} is not the previous {last_total} + this round's "
                             f"{record['steps']} + {record['unreported_steps']} unreported: steps are missing from the ledger")
        if previous and server_round <= previous["round"]:
            self.flag_record("inconsistent", record, f"round {server_round} follows the site's round {previous['round']}")
        elif server_round <= self.closed:
            self.flag_record("inconsistent", record, f"a record for round {server_round} after round {self.closed} was closed")
        if record["accountant"] in _FIXED_COUNTERPART and record["sample_rate"] != 1.0:
            self.flag_record("inconsistent", record, f"central DP claims no amplification by sampling, but the "
                             f"record has sample rate {record['sample_rate']:g} (expected 1)")
        for key in ("delta", "budget_epsilon"):
            if previous and record[key] != previous[key]:
                self.flag_record("inconsistent", record, f"{key} changed from {previous[key]:g} to {record[key]:g}")
        if previous and record["releases"] < previous["releases"]:
            self.flag_record("gap", record, f"releases fell from {previous['releases']} to {record['releases']}: "
                             "a popularity release is missing from the ledger")
        if previous and previous["releases"] and record["release_noise_multiplier"] != previous["release_noise_multiplier"]:
            self.flag_record("inconsistent", record, "the popularity release's σ changed from "
                             f"{previous['release_noise_multiplier']:g} to {record['release_noise_multiplier']:g}")

    def _mismatch_message(self, record: dict, recomputed: float) -> str:
        reported = record["epsilon"]
        relative = (reported - recomputed) / recomputed if 0 < recomputed < math.inf else math.inf
        hint = ""
        if record["accountant"] in _FIXED_COUNTERPART:
            hint = f"; recomputed by {_FIXED_COUNTERPART[record['accountant']]}"
        elif _COUNTERPART.get(record["accountant"]) != self.accountant:
            hint = (f"; the site used Opacus' {record['accountant']}"
                    + (f", audit with --accountant {_COUNTERPART[record['accountant']]} to compare like with like"
                       if record["accountant"] in _COUNTERPART else ", an approximation rather than a bound"))
        size = f"{abs(relative):.1%} " if math.isfinite(relative) else ""
        return (f"reported ε {reported:.4g} is {size}{'above' if reported > recomputed else 'below'} "
                f"the recomputed {recomputed:.4g} (σ {record['noise_multiplier']:g}, q {record['sample_rate']:g}, "
                f"{record['steps']} steps, {record['total_steps']} in all, δ {record['delta']:g}){hint}")

    def round_record(self, record: dict) -> None:
        server_round, listed = record["round"], record["sites"]
        if server_round <= self.closed:
            self.flag("inconsistent", f"round record {server_round} follows round record {self.closed}",
                      site=None, server_round=server_round)
        for earlier in sorted(r for r in self.open_rounds if r < server_round):
            self._unclosed(earlier)
        expected = round_digest(self.digest, self.round_records.pop(server_round, []))
        if record["digest"] != LEGACY_DIGEST and record["digest"] != expected:
            self.flag("tampered", f"round {server_round}'s digest does not match its records and the rounds before: "
                      "a record was edited, removed or reordered (or the run was resumed from another ledger)",
                      site=None, server_round=server_round)
        self.digest = record["digest"]  # check each later round against the chain as written
        present = self.open_rounds.pop(server_round, [])
        for name in (n for n in listed if n not in present):
            self.flag("gap", f"round {server_round} lists site {name} but the ledger has no record of it that round",
                      site=name, server_round=server_round)
        for name in (n for n in present if n not in listed):
            self.flag("gap", f"site {name} has a record in round {server_round} that the round record does not list",
                      site=name, server_round=server_round)
        self.closed = max(self.closed, server_round)

    def _unclosed(self, server_round: int) -> None:
        for name in self.open_rounds.pop(server_round):
            self.flag("gap", f"round {server_round} has a record of site {name} but no round record "
                      "(the run stopped mid-round, or the line was removed)", site=name, server_round=server_round)

    def finish(self, *, workers: int | None) -> None:
        for server_round in sorted(self.open_rounds):
            self._unclosed(server_round)
        names = sorted(self.sites)
        # unreported steps were spent at the site's (fixed) mechanism too: they are composed like the others
        rounds = [self._mechanisms(self.sites[name]) for name in names]
        accountants = [_FIXED_COUNTERPART.get(self.sites[name][-1]["accountant"], self.accountant) for name in names]
        for name, recomputed in zip(names, _series_by_site(rounds, accountants=accountants, workers=workers)):
            records = self.sites[name]
            self.series[name] = [RoundEpsilon(r["round"], r["status"], r["epsilon"], eps) for r, eps in zip(records, recomputed)]
            self._check_epsilon(records, recomputed)
        self.findings.sort(key=lambda f: (f.round or 0, f.site or ""))

    @staticmethod
    def _mechanisms(records: list[dict]) -> list[Round]:
        """Each record's mechanisms: its steps, and the popularity releases it is the first to report."""
        rounds, released = [], 0
        for r in records:
            new_releases = max(0, r["releases"] - released)
            released = max(released, r["releases"])
            rounds.append((r["sample_rate"], r["noise_multiplier"],
                           (r["steps"] if r["status"] == "trained" else 0) + r["unreported_steps"], r["delta"],
                           r["release_noise_multiplier"], new_releases))
        return rounds

    def _check_epsilon(self, records: list[dict], recomputed: list[float]) -> None:
        mismatches = []
        overspent = False
        for record, ours in zip(records, recomputed):
            theirs = record["epsilon"]
            if abs(theirs - ours) > self.tolerance * ours + self.abs_tolerance or math.isinf(theirs) != math.isinf(ours):
                mismatches.append((record, ours))
            spent = max(theirs, ours)
            if not overspent and spent > record["budget_epsilon"] * (1 + self.tolerance):
                overspent = True  # once per site: later rounds only spend more
                which = "reported" if theirs >= ours else "recomputed"
                self.flag_record("overspend", record,
                                 f"ε {spent:.4g} ({which}) is over the site's budget {record['budget_epsilon']:g}")
        if mismatches:  # once per site: later rounds mostly inherit the first difference
            later = f"; {len(mismatches) - 1} later record(s) differ too" if len(mismatches) > 1 else ""
            first, ours = mismatches[0]
            self.flag_record("mismatch", first, self._mismatch_message(first, ours) + later)

    def rows(self) -> list[SiteRow]:
        flagged = {f.site for f in self.findings}
        rows = []
        for name, records in sorted(self.sites.items()):
            trained = [r for r in records if r["status"] == "trained"]
            last, point = records[-1], self.series[name][-1]
            sigmas = [r["noise_multiplier"] for r in trained] or [last["noise_multiplier"]]
            rates = [r["sample_rate"] for r in trained] or [last["sample_rate"]]
            rows.append(SiteRow(
                site=name, rounds_trained=len(trained), rounds_declined=len(records) - len(trained),
                total_steps=last["total_steps"], unreported_steps=sum(r["unreported_steps"] for r in records), sigma=(min(sigmas), max(sigmas)), sample_rate=(min(rates), max(rates)),
                epsilon_reported=point.reported, epsilon_recomputed=point.recomputed, budget=last["budget_epsilon"],
                remaining=last["budget_epsilon"] - point.recomputed, ok=name not in flagged,
                release_sigma=last["release_noise_multiplier"] if last["releases"] else 0.0,
            ))
        return rows


def audit_ledger(
    path: Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    accountant: str = "pld",
    abs_tolerance: float = ABS_TOLERANCE,
    workers: int | None = None,
) -> AuditReport:
    """Recompute each site's ε round by round from the ledger's mechanism parameters and check the ledger."""
    if accountant not in AUDIT_ACCOUNTANTS:
        raise ConfigError(f"unknown audit accountant {accountant!r}; valid: {', '.join(AUDIT_ACCOUNTANTS)}")
    if not tolerance >= 0:
        raise ConfigError(f"--tolerance must be a non-negative fraction (0.02 = 2%), got {tolerance}")
    started = time.perf_counter()
    records = read_ledger(path)
    audit = _Audit(accountant=accountant, tolerance=tolerance, abs_tolerance=abs_tolerance)
    for record in records:
        (audit.site_record if record["kind"] == "site-round" else audit.round_record)(record)
    audit.finish(workers=workers)
    return AuditReport(
        ledger=str(path), accountant=accountant, tolerance=tolerance, abs_tolerance=abs_tolerance,
        rounds=sum(r["kind"] == "round" for r in records), sites=audit.rows(), series=audit.series,
        findings=audit.findings, seconds=time.perf_counter() - started,
    )


# -- output -------------------------------------------------------------------------------------

def _span(values: tuple[float, float]) -> str:
    low, high = values
    return f"{low:.4g}" if low == high else f"{low:.4g}–{high:.4g}"


_COLUMNS: list[tuple[str, Callable[[SiteRow], str]]] = [
    ("site", lambda r: r.site),
    ("trained", lambda r: str(r.rounds_trained)),
    ("declined", lambda r: str(r.rounds_declined)),
    ("steps", lambda r: str(r.total_steps)),
    ("unreported", lambda r: str(r.unreported_steps)),
    ("σ", lambda r: _span(r.sigma)),
    ("q", lambda r: _span(r.sample_rate)),
    ("release σ", lambda r: f"{r.release_sigma:.4g}" if r.release_sigma else "–"),
    ("ε reported", lambda r: f"{r.epsilon_reported:.4f}"),
    ("ε recomputed", lambda r: f"{r.epsilon_recomputed:.4f}"),
    ("budget", lambda r: f"{r.budget:g}"),
    ("remaining", lambda r: f"{r.remaining:.4f}"),
    ("ok", lambda r: "yes" if r.ok else "NO"),
]


def _summary(report: AuditReport) -> str:
    central = any(r.site == CENTRAL_SITE for r in report.sites)
    return (f"privacy ledger {report.ledger}: {len(report.sites)} sites, {report.rounds} rounds; ε recomputed with "
            f"dp_accounting {report.accountant.upper()}{' (central DP: Opacus RDP)' if central else ''} "
            f"(tolerance {report.tolerance:.1%} + {report.abs_tolerance:g}) in {report.seconds:.1f}s")


def _finding_lines(report: AuditReport, *, bullet: str) -> list[str]:
    if not report.findings:
        return ["no findings: every reported ε matches the recomputed one, is within budget, and the ledger has no gaps"]
    lines = [f"{len(report.findings)} finding(s):"]
    for f in report.findings:
        where = ", ".join(part for part in (f.site and f"site {f.site}", f.round and f"round {f.round}") if part)
        lines.append(f"{bullet}{f.kind}: {where}: {f.message}")
    return lines


def format_table(report: AuditReport) -> str:
    """The per-site table and the findings as plain text."""
    cells = [[header for header, _ in _COLUMNS]] + [[cell(row) for _, cell in _COLUMNS] for row in report.sites]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    return "\n".join([_summary(report), "", *table, "", *_finding_lines(report, bullet="  ")])


def to_markdown(report: AuditReport) -> str:
    """The per-site table and the findings as Markdown."""
    header = [h for h, _ in _COLUMNS]
    rows = ["| " + " | ".join(cell(row) for _, cell in _COLUMNS) + " |" for row in report.sites]
    return "\n".join([_summary(report), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows, "",
                      *_finding_lines(report, bullet="- ")])


def to_json(report: AuditReport) -> str:
    """The whole report as strict JSON (an infinite ε is written as the string "inf")."""
    return json.dumps(_finite({**dataclasses.asdict(report), "ok": report.ok}), indent=2)


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def plot_epsilon(report: AuditReport, path: Path) -> Path:
    """A PNG of ε per round per site: recomputed solid, reported dashed, budgets dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, points) in enumerate(report.series.items()):
        rounds, color = [p.round for p in points], colors[i % len(colors)]
        ax.plot(rounds, [p.recomputed for p in points], color=color, marker="o", markersize=3, label=name)
        ax.plot(rounds, [p.reported for p in points], color=color, linestyle="--", linewidth=1)
    for budget in sorted({row.budget for row in report.sites}):
        ax.axhline(budget, color="black", linestyle=":", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent")
    ax.set_title(f"ε per site: recomputed ({report.accountant.upper()}) solid, reported dashed, budget dotted", fontsize=9)
    ax.grid(alpha=0.3)
    if 0 < len(report.series) <= 12:  # beyond that a legend hides the plot
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command line -------------------------------------------------------------------------------

def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """`hierfed audit RUN_DIR [--json | --markdown] [--tolerance F] [--accountant pld|rdp] [--plot PATH]`."""
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help=f"a run directory holding {LEDGER_FILE}, or a ledger file")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument("--markdown", action="store_true", help="print the report as Markdown")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="relative difference in ε (and overshoot of the budget) still accepted (default 0.02)")
    parser.add_argument("--accountant", choices=AUDIT_ACCOUNTANTS, default="pld",
                        help="dp_accounting accountant that recomputes ε: pld (default; compares with Opacus' prv) or rdp")
    parser.add_argument("--plot", type=Path, help="where to write the ε-per-round PNG (default RUN_DIR/epsilon.png)")
    empirical = parser.add_argument_group("empirical audit (canary users, one training run)")
    empirical.add_argument("--empirical", action="store_true",
                           help="train --site again with canary users and bound its ε from below (exit 1 above the claimed ε)")
    empirical.add_argument("--site", help="with --empirical: the site to audit, by its name in the run's partitions")
    empirical.add_argument("--canaries", type=int, default=200, metavar="M", help="with --empirical: canary users (default 200)")
    empirical.add_argument("--confidence", type=float, default=0.95, help="with --empirical: of the lower bound (default 0.95)")


def ledger_path(run_dir: Path) -> Path:
    """The ledger file a RUN_DIR argument names."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DataError(f"{run_dir}: no such run directory or ledger file; pass the folder the run wrote")
    return run_dir / LEDGER_FILE if run_dir.is_dir() else run_dir


def run_audit(args: argparse.Namespace) -> int:
    """Audit a run's ledger, print the report, write the plot; 0 when all is well, 1 on findings."""
    if getattr(args, "empirical", False):
        return run_empirical_audit(args)
    if getattr(args, "site", None):
        raise ConfigError("--site picks the site of an empirical audit: add --empirical")
    ledger = ledger_path(args.run_dir)
    report = audit_ledger(ledger, tolerance=args.tolerance, accountant=args.accountant)
    plot = args.plot or ledger.parent / EPSILON_PLOT
    if report.series:
        plot_epsilon(report, plot)
    if args.json:
        print(to_json(report))
    else:
        print(to_markdown(report) if args.markdown else format_table(report))
        if report.series:
            print(f"\nε per round: {plot}")
    return 0 if report.ok else 1


def run_empirical_audit(args: argparse.Namespace) -> int:
    """`hierfed audit RUN_DIR --empirical --site NAME`: the canary audit of hiermodel.canary_audit;
    prints the table (or --json), writes RUN_DIR/empirical-audit-NAME.json; 1 when ε_lb > claimed ε."""
    from hiermodel.canary_audit import audit_site, format_report, load_site, report_path, write_report

    if not args.site:
        raise ConfigError("--empirical needs --site NAME: the site whose training is audited")
    if not Path(args.run_dir).is_dir():
        raise DataError(f"{args.run_dir}: no such run directory; pass the folder `hierfed simulate --out` wrote")
    dataset, config = load_site(args.run_dir, args.site)
    audit = audit_site(dataset, config, site=args.site, canaries=args.canaries, confidence=args.confidence,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    path = write_report(audit, report_path(args.run_dir, args.site))
    if args.json:
        print(json.dumps(audit.to_dict(), indent=2))
    else:
        print(format_report(audit) + f"\n\nreport: {path}")
    return 0 if audit.ok else 1
