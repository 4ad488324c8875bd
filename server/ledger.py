"""The append-only privacy ledger of a run (ledger.jsonl): what every site reported after every round.

One JSON object per line: a "site-round" record per site that replied, then a "round" record
naming those sites. Each round is written in one go, flushed and fsynced, so the file holds every
completed round after a crash.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

from hiermodel.errors import DataError

LEDGER_FILE = "ledger.jsonl"
STATUSES = ("trained", "declined")
ACCOUNTANTS = ("prv", "rdp", "gdp")

# field -> JSON type; "float" accepts integers too (some encoders write 1.0 as 1)
SITE_FIELDS = {
    "kind": "str", "round": "int", "site": "str", "seq": "int", "status": "str", "accountant": "str",
    "noise_multiplier": "float", "sample_rate": "float", "steps": "int", "total_steps": "int",
    "clip_norm": "float", "delta": "float", "epsilon": "float", "budget_epsilon": "float", "users": "int",
}
ROUND_FIELDS = {"kind": "str", "round": "int", "sites": "list"}
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
    if record["round"] < 1 or record["seq"] < 1 or record["steps"] < 0 or record["total_steps"] < record["steps"]:
        return "round and seq must be >= 1 and 0 <= steps <= total_steps"
    if record["status"] == "declined" and record["steps"] != 0:
        return f"a declined round has 0 steps, this one has {record['steps']}"
    if not (0 < record["sample_rate"] <= 1 and 0 < record["delta"] < 1):
        return "sample_rate must be in (0, 1] and delta in (0, 1)"
    numbers = ("noise_multiplier", "clip_norm", "epsilon", "budget_epsilon")
    if not all(record[n] >= 0 for n in numbers):  # NaN fails this too
        return f"{', '.join(numbers)} must be non-negative numbers"
    return None


def read_ledger(path: Path) -> list[dict]:
    """Every record of a ledger file, in order; DataError names the first malformed line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no privacy ledger here; pass a run directory holding {LEDGER_FILE}, or the file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the privacy ledger ({exc}); check the file and its permissions") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"not JSON ({exc.msg} at column {exc.colno})"
        else:
            problem = record_problem(record)
        if problem:
            raise DataError(
                f"{path}, line {number}: {problem}; the line is truncated or edited — restore it, or remove it "
                "and audit again (the audit then reports the gap)"
            )
        records.append(record)
    return records


class PrivacyLedger:
    """Appends rounds to a ledger file; a ledger that already exists (a resumed run) is continued."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seq: dict[str, int] = {}
        if self.path.exists():
            for record in read_ledger(self.path):
                if record["kind"] == "site-round":
                    self._seq[record["site"]] = max(self._seq.get(record["site"], 0), record["seq"])

    def append_round(self, server_round: int, records: list[dict]) -> None:
        """Validate the sites' records, number them, and write them and the round record durably."""
        sites = [r.get("site") for r in records]
        if len(set(sites)) != len(sites):
            raise ValueError(f"round {server_round}: a site has more than one record ({sites})")
        seq = dict(self._seq)
        lines = []
        for reported in records:
            site = reported.get("site")
            if reported.get("round", server_round) != server_round:
                raise ValueError(f"round {server_round}: the record of site {site!r} is for round {reported['round']}")
            seq[site] = seq.get(site, 0) + 1
            record = {**reported, "kind": "site-round", "round": server_round, "seq": seq[site]}
            problem = record_problem(record)
            if problem:
                raise ValueError(f"round {server_round}, site {site!r}: {problem}")
            lines.append(json.dumps({name: _PLAIN[kind](record[name]) for name, kind in SITE_FIELDS.items()}))
        lines.append(json.dumps({"kind": "round", "round": server_round, "sites": sites}))
        self._write("".join(line + "\n" for line in lines))
        self._seq = seq  # only once the round is on disk

    def _write(self, text: str) -> None:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)  # one write per round keeps a crash from interleaving rounds
            f.flush()
            os.fsync(f.fileno())
        if created and hasattr(os, "O_DIRECTORY"):  # a new file's name is durable only once its folder is synced
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
