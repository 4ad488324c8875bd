"""Per-round results of a federated run, written to results.json after every round."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hiermodel.run_config import RunConfig
from hiermodel.data.store import MANIFEST, read_manifest
from hiermodel.privacy import ACCOUNTANT_CODES
from server.global_model import GlobalModel
from server.ledger import CENTRAL_SITE, LEDGER_FILE, PrivacyLedger, record_problem
from server.run_directory import RunDirectory
from server.strategy import RoundLog


ACCOUNTANT_NAMES = {code: name for name, code in ACCOUNTANT_CODES.items()}


class RunResults:
    def __init__(self, *, config: RunConfig, round_log: RoundLog, run_dir: RunDirectory, model: GlobalModel, log) -> None:
        self.config = config
        self.round_log = round_log
        self.run_dir = run_dir
        self.model = model
        self.log = log
        self.rows: list[dict] = []
        self.initial: dict[str, float] = {}
        self.sites = _site_names(config)
        self.ledger = PrivacyLedger(run_dir.folder / LEDGER_FILE) if config.dp.ledgered else None

    def end_round(
        self, server_round: int, state: dict[str, np.ndarray], server_metrics: dict[str, float], *, evaluate_seconds: float = 0.0,
        optimizer: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Called once the round's global state exists: checkpoint it (with the server optimizer's state)
        and flush results.json."""
        if server_round == 0:
            self.initial = server_metrics
            return
        checkpoint = self.run_dir.checkpoint(server_round, state, optimizer)
        entry = self.round_log.entry(server_round)
        privacy = self._privacy_records(server_round, entry) if self.ledger is not None else []
        row = {
            "round": server_round,
            "checkpoint": checkpoint,
            "train": entry.get("train", {}),
            "client_evaluate": entry.get("client_evaluate", {}),
            "server_evaluate": server_metrics,
            "clients": self._clients(entry),
            "sites": self._site_metrics(entry),
            "failures": [{**f, "site": self._site_of(entry["clients"].get(f["node"], {}), f["node"])} for f in entry["failures"]],
            "rejected": [{**r, "site": self._site_of(entry["clients"][r["node"]], r["node"])} for r in entry.get("rejected", [])],
            "privacy_errors": entry.get("privacy_errors", []),
            "replies": self._reply_counts(entry),
            "wall_seconds": time.time() - entry.get("started", time.time()),
            "time": self._time_split(entry, evaluate_seconds),
        }
        self.rows.append(row)
        if self.ledger is not None:
            self.ledger.append_round(server_round, privacy)
        self.run_dir.write_results(self._payload())
        shown = server_metrics or row["client_evaluate"]
        self.log(
            f"round {server_round}/{self.config.fed.rounds}: {row['replies']['train']} sites aggregated, "
            f"{row['replies']['rejected']} rejected, {row['replies']['failed']} failed, loss {row['train'].get('loss', float('nan')):.4f}, "
            f"ndcg@10 {shown.get('ndcg@10', float('nan')):.4f}, explore@20 {shown.get('explore_recall@20', float('nan')):.4f} "
            f"({row['wall_seconds']:.1f}s)"
        )
        central = entry.get("central")
        if central is not None:
            zeros = f"; {entry['zero_updates']} of {central['users']} sampled sites counted as zero updates" \
                if "zero_updates" in entry else ""
            self.log(f"  central DP: {'released' if central['steps'] else 'not released'}, ε {central['epsilon']:.4g} "
                     f"of {central['budget_epsilon']:g} spent{zeros}")
        for failure in row["failures"]:
            self.log(f"  site {failure['site']} failed ({failure['phase']}): {failure['reason']}")
        for rejected in row["rejected"]:
            self.log(f"  site {rejected['site']}: update rejected: {rejected['reason']}")

    @staticmethod
    def _reply_counts(entry: dict) -> dict[str, int]:
        """How the sites' training replies ended: aggregated, declined (no budget or no users), rejected, failed."""
        metrics = [c for c in entry["clients"].values() if "train_metrics" in c]
        declined = sum(c["train_metrics"].get("num-examples") == 0 for c in metrics)
        rejected = len(entry.get("rejected", []))
        return {"train": len(metrics) - declined - rejected, "declined": declined, "rejected": rejected,
                "failed": len(entry["failures"])}

    @staticmethod
    def _time_split(entry: dict, evaluate_seconds: float) -> dict[str, float]:
        """Where the round's wall time went; sites train in parallel, so training is the slowest site."""
        wall = time.time() - entry.get("started", time.time())
        train = [c["train_metrics"].get("train-seconds", 0.0) for c in entry["clients"].values() if "train_metrics" in c]
        split = {
            "site_training_max": max(train, default=0.0),
            "site_training_sum": float(sum(train)),
            "aggregation": entry.get("aggregation_seconds", 0.0),
            "server_evaluation": evaluate_seconds,
        }
        split["framework_and_site_evaluation"] = max(
            wall - split["site_training_max"] - split["aggregation"] - split["server_evaluation"], 0.0
        )
        return split

    def _privacy_records(self, server_round: int, entry: dict) -> list[dict]:
        """One ledger record per site that replied this round, from the dp-* metrics it reported.

        A site whose privacy metrics do not make a valid record is logged and listed in the round's
        `privacy_errors` instead: one site's bad report must not stop the run or the ledger.
        """
        records, seen = [], set()
        for node, client in entry["clients"].items():
            m = client.get("train_metrics", {})
            if "dp-noise-multiplier" not in m:
                continue
            site = self._site_of(client, node)
            if site in seen or site == CENTRAL_SITE:  # two replies claim one site (or central DP's name): told apart by node
                site = f"{site}@node-{node}"
            try:
                record = {
                    "round": server_round,
                    "site": site,
                    "status": "declined" if m.get("dp-declined") else "trained",
                    "accountant": ACCOUNTANT_NAMES[int(m["dp-accountant"])],
                    "noise_multiplier": float(m["dp-noise-multiplier"]),
                    "sample_rate": float(m["dp-sample-rate"]),
                    "steps": int(m["dp-steps"]),
                    "total_steps": int(m["dp-total-steps"]),
                    "clip_norm": float(m["dp-clip-norm"]),
                    "delta": float(m["dp-delta"]),
                    "epsilon": float(m["dp-epsilon"]),
                    "budget_epsilon": float(m["dp-budget"]),
                    "users": int(m["dp-users"]),
                    "release_noise_multiplier": float(m.get("dp-release-noise-multiplier", 0.0)),
                    "releases": int(m.get("dp-releases", 0)),
                }
                problem = record_problem({**record, "kind": "site-round", "seq": 1, "unreported_steps": 0})
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                entry.setdefault("privacy_errors", []).append({"site": site, "reason": problem[:300]})
                self.log(f"  site {site}: privacy metrics not recorded in the ledger: {problem[:300]}")
                continue
            seen.add(site)
            records.append(record)
        if "central" in entry:  # the federation's own mechanism (central DP), as one more record
            records.append(entry["central"])
        return records

    def _clients(self, entry: dict) -> dict[str, dict]:
        """Bytes per client (by site where known)."""
        out = {}
        for node, c in entry["clients"].items():
            name = self._site_of(c, node)
            out[name] = {k: v for k, v in c.items() if k.startswith("bytes")}
        return out

    def _site_metrics(self, entry: dict) -> dict[str, dict]:
        out = {}
        for node, c in entry["clients"].items():
            metrics = {**c.get("train_metrics", {}), **{f"eval-{k}": v for k, v in c.get("evaluate_metrics", {}).items()}}
            out[self._site_of(c, node)] = metrics
        return out

    def _site_of(self, client: dict, node: str) -> str:
        metrics = client.get("train_metrics") or client.get("evaluate_metrics") or {}
        index = metrics.get("site-index")
        if index is not None and int(index) in self.sites:
            return self.sites[int(index)]
        return f"node-{node}"

    def _payload(self) -> dict:
        return {"run_config": self.config.to_flat(), "initial_server_evaluate": self.initial, "rounds": self.rows}

    def resume_from(self, rows: list[dict], initial: dict) -> None:
        """Continue after rounds a killed run already completed."""
        self.rows = list(rows)
        self.initial = dict(initial)

    def finish(self, state: dict[str, np.ndarray], *, wall_seconds: float) -> dict:
        """The final global model, results.json and the plots."""
        self.run_dir.write_model(self.model.load(state), self.config)
        payload = {**self._payload(), "wall_seconds": wall_seconds,
                   "trainable_parameters": int(sum(v.size for v in state.values())),
                   "final": self.rows[-1] if self.rows else {}}
        self.run_dir.write_results(payload)
        self.run_dir.plot(self.rows, site_split=self.config.fed.evaluate_split)
        self.log(f"wrote {self.run_dir.folder}: results.json, model/, checkpoints/, metrics.png")
        return payload


def _site_names(config: RunConfig) -> dict[int, str]:
    """partition-id -> site name, from a simulation's partition manifest (if any)."""
    if not config.fed.partitions_dir:
        return {}
    folder = Path(config.fed.partitions_dir)
    if not (folder / MANIFEST).exists():
        return {}
    return {int(m["partition"]): m["site"] for m in read_manifest(folder)}
