"""The privacy ledger and its audit: sites simulated with Opacus' own accountants, audited with
dp_accounting's, then the ledger tampered with line by line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from hiermodel.errors import DataError
from server.audit import _can_fork, add_audit_arguments, audit_ledger, epsilon_series, recompute_epsilon, run_audit, to_markdown
from server.ledger import LEDGER_FILE, PrivacyLedger, read_ledger

DELTA = 1e-5
ROUNDS = 4
# site -> (q, σ, steps per round, rounds it declines); ε ends between ~1.5 and ~4
SITES = {"north": (0.05, 1.1, 20, ()), "south": (0.1, 1.3, 10, (3,)), "east": (0.02, 0.9, 50, ())}


def simulate(sites: dict, *, accountant: str = "prv", budget: float = 8.0) -> list[list[dict]]:
    """Each round's records, ε from an Opacus accountant stepped as DP-SGD steps it."""
    from opacus.accountants import create_accountant

    accountants = {name: create_accountant(mechanism=accountant) for name in sites}
    totals = dict.fromkeys(sites, 0)
    epsilons = dict.fromkeys(sites, 0.0)
    rounds = []
    for server_round in range(1, ROUNDS + 1):
        records = []
        for name, (q, sigma, steps, declined) in sites.items():
            trained = server_round not in declined
            if trained:
                for _ in range(steps):
                    accountants[name].step(noise_multiplier=sigma, sample_rate=q)
                totals[name] += steps
                epsilons[name] = accountants[name].get_epsilon(delta=DELTA)
            records.append({
                "site": name, "status": "trained" if trained else "declined", "accountant": accountant,
                "noise_multiplier": sigma, "sample_rate": q, "steps": steps if trained else 0,
                "total_steps": totals[name], "clip_norm": 1.0, "delta": DELTA, "epsilon": epsilons[name],
                "budget_epsilon": budget, "users": round(32 / q),
            })
        rounds.append(records)
    return rounds


@pytest.fixture(scope="module")
def prv_rounds() -> list[list[dict]]:
    return simulate(SITES)


def write_ledger(folder: Path, rounds: list[list[dict]]) -> Path:
    ledger = PrivacyLedger(folder / LEDGER_FILE)
    for server_round, records in enumerate(rounds, 1):
        ledger.append_round(server_round, [dict(r) for r in records])
    return folder / LEDGER_FILE


def edit_line(path: Path, match, change) -> int:
    """Apply ``change`` to the first line whose record satisfies ``match``; its line number."""
    lines = path.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if match(json.loads(line)))
    lines[number] = change(lines[number])
    path.write_text("".join(line + "\n" for line in lines if line is not None))
    return number + 1


def is_site(name: str, server_round: int):
    return lambda r: r["kind"] == "site-round" and r["site"] == name and r["round"] == server_round


def set_field(key: str, value):
    return lambda line: json.dumps({**json.loads(line), key: value})


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_audit_arguments(parser)
    return parser.parse_args(list(argv))


def test_audit_agrees_with_opacus_prv(tmp_path: Path, prv_rounds: list[list[dict]]) -> None:
    report = audit_ledger(write_ledger(tmp_path, prv_rounds))
    assert report.ok, report.findings
    assert report.rounds == ROUNDS and [row.site for row in report.sites] == sorted(SITES)
    differences = [abs(p.reported - p.recomputed) / p.recomputed for s in report.series.values() for p in s]
    assert max(differences) < 0.02  # measured: PRV sits 0.3–0.7% above PLD here
    north = next(row for row in report.sites if row.site == "north")
    assert north.total_steps == 80 and north.remaining == pytest.approx(8.0 - north.epsilon_recomputed)


def test_declined_round_spends_nothing(tmp_path: Path, prv_rounds: list[list[dict]]) -> None:
    report = audit_ledger(write_ledger(tmp_path, prv_rounds))
    south = next(row for row in report.sites if row.site == "south")
    assert (south.rounds_trained, south.rounds_declined, south.total_steps) == (3, 1, 30)
    series = report.series["south"]
    assert series[2].status == "declined" and series[2].recomputed == series[1].recomputed
    assert not [f for f in report.findings if f.site == "south"]


def test_edited_sigma_is_a_mismatch_at_that_site_and_round(tmp_path: Path, prv_rounds: list[list[dict]]) -> None:
    path = write_ledger(tmp_path, prv_rounds)
    edit_line(path, is_site("north", 2), set_field("noise_multiplier", 1.4))
    report = audit_ledger(path)
    # the digest chain breaks at that round too
    assert [(f.kind, f.site, f.round) for f in report.findings] == [("tampered", None, 2), ("mismatch", "north", 2)]
    assert "σ 1.4" in report.findings[1].message
    assert run_audit(cli_args(str(tmp_path))) == 1


def test_removed_record_is_a_gap(tmp_path: Path, prv_rounds: list[list[dict]]) -> None:
    path = write_ledger(tmp_path, prv_rounds)
    edit_line(path, is_site("east", 2), lambda line: None)
    report = audit_ledger(path)
    gaps = {(f.site, f.round) for f in report.findings if f.kind == "gap"}
    assert ("east", 2) in gaps and ("east", 3) in gaps  # listed but missing in round 2; seq and steps jump in 3
    assert [(f.kind, f.round) for f in report.findings if f.site is None] == [("tampered", 2)]
    assert all(f.site in ("east", None) for f in report.findings)


def test_round_records_must_match_and_increase(tmp_path: Path, prv_rounds: list[list[dict]]) -> None:
    path = write_ledger(tmp_path, prv_rounds)
    is_round = lambda n: lambda r: r["kind"] == "round" and r["round"] == n  # noqa: E731
    edit_line(path, is_round(2), set_field("sites", ["south", "east"]))
    edit_line(path, is_round(4), set_field("round", 3))
    found = {(f.kind, f.site, f.round) for f in audit_ledger(path).findings}
    assert ("gap", "north", 2) in found  # a record the round record leaves out
    assert ("inconsistent", None, 3) in found  # round record 3 twice
    assert {("gap", name, 4) for name in SITES} <= found  # round 4's records never closed


def test_epsilon_over_budget_is_an_overspend(tmp_path: Path) -> None:
    sites = {"north": SITES["north"]}
    report = audit_ledger(write_ledger(tmp_path, simulate(sites, budget=2.2)))  # ε 1.60, 2.01, 2.35, 2.64
    assert [(f.kind, f.site) for f in report.findings] == [("overspend", "north")]
    assert report.findings[0].round == 3 and not report.sites[0].ok and report.sites[0].remaining < 0


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda line: line[: len(line) // 2], "not JSON"),
        (lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "steps"}), "missing field 'steps'"),
        (set_field("steps", "20"), "field 'steps'"),
    ],
)
def test_malformed_line_is_a_data_error_naming_it(tmp_path: Path, prv_rounds: list[list[dict]], change, problem: str) -> None:
    path = write_ledger(tmp_path, prv_rounds)
    number = edit_line(path, is_site("south", 2), change)
    with pytest.raises(DataError, match=rf"line {number}: {problem}"):
        audit_ledger(path)
    with pytest.raises(DataError):
        run_audit(cli_args(str(tmp_path)))


def test_missing_ledger_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no privacy ledger"):
        run_audit(cli_args(str(tmp_path)))


def test_run_audit_prints_json_and_writes_the_plot(tmp_path: Path, prv_rounds: list[list[dict]], capsys) -> None:
    write_ledger(tmp_path, prv_rounds)
    assert run_audit(cli_args(str(tmp_path), "--json")) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is True and {s["site"] for s in payload["sites"]} == set(SITES)
    assert len(payload["series"]["east"]) == ROUNDS
    assert (tmp_path / "epsilon.png").stat().st_size > 0
    assert run_audit(cli_args(str(tmp_path / LEDGER_FILE), "--plot", str(tmp_path / "p.png"))) == 0
    out = capsys.readouterr().out
    assert "no findings" in out and "north" in out and (tmp_path / "p.png").exists()
    assert "| north |" in to_markdown(audit_ledger(tmp_path / LEDGER_FILE))


def test_rdp_sites_audited_with_rdp(tmp_path: Path) -> None:
    report = audit_ledger(write_ledger(tmp_path, simulate(SITES, accountant="rdp")), accountant="rdp")
    assert report.ok, report.findings


def test_ledger_continues_a_resumed_run_and_rejects_bad_records(tmp_path: Path, prv_rounds: list[list[dict]]) -> None:
    path = write_ledger(tmp_path, prv_rounds[:2])
    resumed = PrivacyLedger(path)
    resumed.append_round(3, prv_rounds[2])
    assert [r["seq"] for r in read_ledger(path) if r["kind"] == "site-round" and r["site"] == "north"] == [1, 2, 3]
    with pytest.raises(ValueError, match="missing field 'epsilon'"):
        resumed.append_round(4, [{k: v for k, v in prv_rounds[3][0].items() if k != "epsilon"}])
    with pytest.raises(ValueError, match="'steps'"):
        resumed.append_round(4, [{**prv_rounds[3][0], "steps": 20.0}])
    last = read_ledger(path)[-1]  # nothing half-written
    assert {k: v for k, v in last.items() if k != "digest"} == {"kind": "round", "round": 3, "sites": list(SITES)}


def test_pld_is_what_pld_accountant_computes() -> None:
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for q, sigma, steps in [(0.05, 1.1, 20), (0.05, 1.1, 20), (0.1, 1.3, 10)]:
        accountant.compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps))
    ours = recompute_epsilon([(0.05, 1.1, 20), (0.05, 1.1, 20), (0.1, 1.3, 10)], DELTA, interval=1e-3)
    assert ours == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)
    assert epsilon_series([(0.05, 0.0, 5, DELTA)]) == [float("inf")]  # no noise
    assert epsilon_series([(0.05, 1.1, 0, DELTA)]) == [0.0]  # nothing trained yet


@pytest.mark.skipif(not _can_fork(), reason="worker processes are forked on Linux only")
def test_workers_give_the_same_answer(tmp_path: Path, prv_rounds: list[list[dict]]) -> None:
    path = write_ledger(tmp_path, prv_rounds)
    assert audit_ledger(path, workers=2).series == audit_ledger(path, workers=1).series
