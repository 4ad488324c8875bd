"""A site's own record of a run, on the site's disk: its privacy plan with the accountant history
(every step it ever took in the run) and its personal λ.

context.state lives only as long as the process; this file outlives a restart of the site, of the
server or of a whole simulation, so a resumed run composes ε over every round the site trained,
including one whose reply the server never received. The file is replaced atomically and carries
a SHA-256 of its content: a damaged file is refused (training on would forget spent ε), never read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from hiermodel.durable_files import atomic_write_text
from hiermodel.errors import DataError

STATE_DIR_ENV = "HIERFED_SITE_STATE"


def state_root(node_config: dict) -> Path:
    """The node config's state-dir, else $HIERFED_SITE_STATE, else ~/.local/state/hierfed/sites."""
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"]))
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else Path.home() / ".local" / "state" / "hierfed" / "sites"


class SiteState:
    """The state file of one site in one run (runs are told apart by the id the server gives them)."""

    def __init__(self, root: Path, *, run_id: str, site: str) -> None:
        safe = lambda text: re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80] or "_"  # noqa: E731
        self.path = Path(root) / safe(run_id or "no-run-id") / f"{safe(site)}.json"

    def load(self) -> dict | None:
        """The saved state, None when this site has none for the run; DataError when it is damaged."""
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"site state {self.path} is unreadable ({exc}); restore it from a backup — "
                            "training on without it would forget the ε this site already spent") from None
        state = payload.get("state") if isinstance(payload, dict) else None
        if not isinstance(state, dict) or payload.get("sha256") != _digest(state):
            raise DataError(f"site state {self.path} fails its checksum (damaged or edited); restore it from a "
                            "backup — training on without it would forget the ε this site already spent")
        return state

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the site's lock from loading its state to saving it, so two rounds of one site that
        overlap cannot both start from the same history and one of them be forgotten."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def save(self, state: dict) -> None:
        """Replace the file atomically and durably: a crash leaves the old state or the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"sha256": _digest(state), "state": state}))


def _digest(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode("utf-8")).hexdigest()
