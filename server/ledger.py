"""The append-only privacy ledger of a run (ledger.jsonl): what every site reported after every round.

One JSON object per line: a "site-round" record per site that replied, then a "round" record
naming those sites. Each round is written in one go, flushed and fsynced, so the file holds every
completed round after a crash. Each round record carries a digest: SHA-256 over the previous
round's digest and this round's site records, so an edited, removed or reordered record breaks
the chain from there on (an integrity check, not a signature: whoever can write the file can
recompute it).

A site whose reported total steps exceeds what the ledger holds for it spent steps the server
never recorded (its reply was lost, came after the round timeout, or the server was killed
mid-round): the server writes them as that record's ``unreported_steps``, so they are composed too.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import time
from pathlib import Path

from hiermodel.durable_files import atomic_write_text, sync_folder
from hiermodel.errors import DataError

LEDGER_FILE = "ledger.jsonl"
EPSILON_PLOT = "epsilon.png"  # `hierfed audit` draws ε per round beside the ledger
STATUSES = ("trained", "declined")
# the sites' Opacus accountants, and Flower's RDP accountant of central DP (server.central_privacy)
ACCOUNTANTS = ("prv", "rdp", "gdp", "flower-rdp")
CENTRAL_SITE = "(central)"  # the record of central DP's mechanism (a site of that name is recorded by its node)

# field -> JSON type; "float" accepts integers too (some encoders write 1.0 as 1)
SITE_FIELDS = {
    "kind": "str", "round": "int", "site": "str", "seq": "int", "status": "str", "accountant": "str",
    "noise_multiplier": "float", "sample_rate": "float", "steps": "int", "total_steps": "int",
    "clip_norm": "float", "delta": "float", "epsilon": "float", "budget_epsilon": "float", "users": "int",
    "unreported_steps": "int",
    "release_noise_multiplier": "float", "releases": "int",  # the site's popularity release(s) so far
}
RELEASE_FIELDS = ("release_noise_multiplier", "releases")
ROUND_FIELDS = {"kind": "str", "round": "int", "sites": "list", "digest": "str"}
GENESIS = "0" * 64  # the digest "before" the first round
LEGACY_DIGEST = ""  # a round record written before the chain existed: nothing to check
_TYPES = {"str": (str,), "int": (numbers.Integral,), "float": (numbers.Real,), "list": (list,)}  # numpy scalars too
_PLAIN = {"int": int, "float": float, "str": str, "list": list}


def record_problem(record: object) -> str | None:
    """What is wrong with one ledger record, or None when it is well formed."""
    if not isinstance(record, dict):
        return "not a JSON object"
    fields = {"site-round": SITE_FIELDS, "round": ROUND_FIELDS}.get(record.get("kind"))
    if fields is None:
        return f"kind is {record.get('kind')!r}, expected 'site-round' or 'round'"
    for name, kind in fields.items():
        if name not in record:
            return f"missing field {name!r}"
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, _TYPES[kind]):  # bool is an int to Python, not here
            return f"field {name!r} is {value!r}, expected {kind}"
    if record["kind"] == "round":
        return None if all(isinstance(s, str) for s in record["sites"]) else "field 'sites' must list site names"
    return _site_values_problem(record)


def _site_values_problem(record: dict) -> str | None:
    if record["status"] not in STATUSES:
        return f"status is {record['status']!r}, expected one of {', '.join(STATUSES)}"
    if record["accountant"] not in ACCOUNTANTS:
        return f"accountant is {record['accountant']!r}, expected one of {', '.join(ACCOUNTANTS)}"
    if record["round"] < 1 or record["seq"] < 1 or min(record["steps"], record["unreported_steps"], record["releases"]) < 0:
        return "round and seq must be >= 1, steps, unreported_steps and releases >= 0"
    if record["total_steps"] < record["steps"] + record["unreported_steps"]:
        return "total_steps must be at least steps + unreported_steps"
    if record["status"] == "declined" and record["steps"] != 0:
        return f"a declined round has 0 steps, this one has {record['steps']}"
    if not (0 < record["sample_rate"] <= 1 and 0 < record["delta"] < 1):
        return "sample_rate must be in (0, 1] and delta in (0, 1)"
    numbers = ("noise_multiplier", "clip_norm", "epsilon", "budget_epsilon", "release_noise_multiplier")
    if not all(record[n] >= 0 for n in numbers):  # NaN fails this too
        return f"{', '.join(numbers)} must be non-negative numbers"
    return None


def canonical(record: dict) -> str:
    """A site record as the digest sees it: its fields only, keys sorted, no spaces. A record
    without a release leaves the release fields out, as ledgers written before them did."""
    released = any(record[name] for name in RELEASE_FIELDS)
    fields = [n for n in SITE_FIELDS if released or n not in RELEASE_FIELDS]
    return json.dumps({name: record[name] for name in fields}, sort_keys=True, separators=(",", ":"))


def round_digest(previous: str, site_records: list[dict]) -> str:
    """The chain digest a round record carries: over the previous digest and this round's site records."""
    text = "\n".join([previous, *(canonical(r) for r in site_records)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no privacy ledger here; pass a run directory holding {LEDGER_FILE}, or the file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the privacy ledger ({exc}); check the file and its permissions") from None


def _parse(line: str) -> tuple[dict | None, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at column {exc.colno})"
    if isinstance(record, dict):  # a ledger from before these fields: no unreported steps, no chain
        if record.get("kind") == "site-round":
            record.setdefault("unreported_steps", 0)
            record.setdefault("release_noise_multiplier", 0.0)
            record.setdefault("releases", 0)
        elif record.get("kind") == "round":
            record.setdefault("digest", LEGACY_DIGEST)
    return record, record_problem(record)


def read_ledger(path: Path) -> list[dict]:
    """Every record of a ledger file, in order; DataError names the first malformed line."""
    path = Path(path)
    records = []
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        record, problem = _parse(line)
        if problem:
            raise DataError(
                f"{path}, line {number}: {problem}; the line is truncated or edited — restore it, or remove it "
                "and audit again (the audit then reports the gap)"
            )
        records.append(record)
    return records


def completed_rounds(path: Path) -> tuple[list[dict], list[str]]:
    """The records up to the last round record whose digest chain holds, and the lines after it.

    What follows the last intact round is what a crash mid-round or mid-write leaves: site records
    of an unclosed round, the last of them possibly cut short. A malformed line with lines after
    it, or a broken digest chain, is not a torn tail but an edit or corruption: DataError.
    """
    lines = [line for line in _read_lines(Path(path)) if line.strip()]
    records: list[dict] = []
    digest, pending, kept = GENESIS, [], 0
    for number, line in enumerate(lines, 1):
        record, problem = _parse(line)
        if problem:
            if number < len(lines):
                raise DataError(f"{path}, record {number}: {problem}, and records follow it: the ledger is "
                                "corrupted, not cut short by a crash; restore it before resuming")
            break
        if record["kind"] == "site-round":
            pending.append(record)
            continue
        if record["digest"] != LEGACY_DIGEST and record["digest"] != round_digest(digest, pending):
            raise DataError(f"{path}, record {number}: round {record['round']}'s digest does not match the records "
                            "before it; the ledger was edited or corrupted — restore it before resuming")
        records += [*pending, record]
        digest, pending, kept = record["digest"], [], number
    return records, lines[kept:]


class PrivacyLedger:
    """Appends rounds to a ledger file; a ledger that already exists (a resumed run) is continued."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seq: dict[str, int] = {}
        self._total: dict[str, int] = {}
        self._digest = GENESIS
        if self.path.exists():
            for record in read_ledger(self.path):
                if record["kind"] == "site-round":
                    self._seq[record["site"]] = max(self._seq.get(record["site"], 0), record["seq"])
                    self._total[record["site"]] = record["total_steps"]
                else:
                    self._digest = record["digest"]

    def append_round(self, server_round: int, records: list[dict]) -> None:
        """Validate the sites' records, number them, and write them and the round record durably."""
        sites = [r.get("site") for r in records]
        if len(set(sites)) != len(sites):
            raise ValueError(f"round {server_round}: a site has more than one record ({sites})")
        seq, totals = dict(self._seq), dict(self._total)
        written = []
        for reported in records:
            site = reported.get("site")
            if reported.get("round", server_round) != server_round:
                raise ValueError(f"round {server_round}: the record of site {site!r} is for round {reported['round']}")
            seq[site] = seq.get(site, 0) + 1
            steps = reported.get("steps", 0) if reported.get("status") == "trained" else 0
            # what the site counts beyond this round and what the ledger holds: spent, never recorded
            unreported = reported.get("unreported_steps",
                                      max(0, int(reported.get("total_steps", 0)) - steps - totals.get(site, 0)))
            record = {"release_noise_multiplier": 0.0, "releases": 0,  # a site that releases nothing may omit them
                      **reported, "kind": "site-round", "round": server_round, "seq": seq[site],
                      "unreported_steps": unreported}
            problem = record_problem(record)
            if problem:
                raise ValueError(f"round {server_round}, site {site!r}: {problem}")
            written.append({name: _PLAIN[kind](record[name]) for name, kind in SITE_FIELDS.items()})
            totals[site] = written[-1]["total_steps"]
        digest = round_digest(self._digest, written)
        lines = [json.dumps(r) for r in written]
        lines.append(json.dumps({"kind": "round", "round": server_round, "sites": sites, "digest": digest}))
        self._write("".join(line + "\n" for line in lines))
        self._seq, self._total, self._digest = seq, totals, digest  # only once the round is on disk

    def _write(self, text: str) -> None:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)  # one write per round keeps a crash from interleaving rounds
            f.flush()
            os.fsync(f.fileno())
        if created:
            sync_folder(self.path.parent)


def keep_completed_rounds(path: Path, last_round: int) -> Path | None:
    """Cut the ledger back to its round ``last_round`` for a resumed run.

    The lines after it (a torn write, or rounds the run directory holds no checkpoint of) are moved
    to a side file, not dropped; the ledger itself is replaced atomically. Returns the side file.
    """
    path = Path(path)
    if not path.exists():
        return None
    records, tail = completed_rounds(path)
    ends = [i + 1 for i, r in enumerate(records) if r["kind"] == "round" and r["round"] <= last_round]
    keep = ends[-1] if ends else 0
    lines = [json.dumps(r) for r in records]
    dropped = lines[keep:] + tail
    if not dropped:
        return None
    side = path.with_name(f"{path.name}.after-round-{last_round}.{int(time.time())}")
    atomic_write_text(side, "".join(line + "\n" for line in dropped))
    atomic_write_text(path, "".join(line + "\n" for line in lines[:keep]))
    return side
