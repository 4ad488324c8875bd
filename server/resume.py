"""Where a resumed run continues: the last round the run directory holds completely.

A round is complete once its checkpoint, its privacy-ledger round (DP runs) and its results.json
row are all on disk; they are written in that order, each atomically, and the row keeps the
checkpoint's SHA-256. A later round that is only partly written is set aside and run again. Its
sites may already have spent ε on it: they keep that on their own disks, and the rerun's ledger
records carry it as unreported steps, so nothing is counted twice and nothing is forgotten.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hiermodel.errors import DataError
from server.ledger import LEDGER_FILE, completed_rounds, keep_completed_rounds
from server.run_directory import RESULTS_FILE, RunDirectory, split_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    completed: int = 0  # rounds done; the run continues with the next one
    state: dict[str, np.ndarray] | None = None  # the global state after them (None: start from scratch)
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)  # the server optimizer's state after them
    rows: list[dict] = field(default_factory=list)  # their results.json rows
    initial: dict = field(default_factory=dict)  # the server evaluation before round 1
    set_aside: list[str] = field(default_factory=list)  # what was moved out of the way, for the log


def find_resume_point(run_dir: RunDirectory, *, dp: bool) -> ResumePoint:
    """The last complete round and its state; cuts the ledger and results back to it."""
    results = run_dir.read_results()
    rows = [r for r in results.get("rounds", []) if isinstance(r, dict) and isinstance(r.get("round"), int)]
    ledger = run_dir.folder / LEDGER_FILE
    ledger_last = max((r["round"] for r in completed_rounds(ledger)[0] if r["kind"] == "round"), default=0) \
        if dp and ledger.exists() else None
    point = ResumePoint(initial=results.get("initial_server_evaluate", {}))
    for row in reversed(rows):
        k = row["round"]
        if ledger_last is not None and k > ledger_last:
            continue  # the results row came before the ledger round: not possible in order, but never trust it
        checkpoint = row.get("checkpoint") or {}
        try:
            point.state, point.optimizer = split_checkpoint(run_dir.load_checkpoint(k, str(checkpoint.get("sha256", ""))))
        except DataError as exc:
            # refused, never used: fall back to the round before it and train this one again
            logger.warning("%s; resuming from an earlier round", exc)
            point.set_aside.append(f"checkpoint of round {k} ({exc})")
            continue
        point.completed = k
        break
    point.rows = [r for r in rows if r["round"] <= point.completed]
    if dp:
        side = keep_completed_rounds(ledger, point.completed)
        if side is not None:
            point.set_aside.append(f"ledger lines after round {point.completed} -> {side.name}")
    if len(point.rows) < len(rows):
        copy = run_dir.folder / f"{RESULTS_FILE}.after-round-{point.completed}.{int(time.time())}"
        shutil.copy2(run_dir.folder / RESULTS_FILE, copy)
        point.set_aside.append(f"results rows of rounds {[r['round'] for r in rows if r['round'] > point.completed]} "
                               f"(the file as it was -> {copy.name})")
    return point


def describe(point: ResumePoint, folder: Path, rounds: int) -> str:
    done = f"after round {point.completed}" if point.completed else "from the start (no complete round yet)"
    aside = f"; set aside: {'; '.join(point.set_aside)}" if point.set_aside else ""
    return f"resuming {folder} {done} of {rounds}{aside}"
