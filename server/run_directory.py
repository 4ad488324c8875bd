"""The run directory the server writes: run_config.json, results.json, checkpoints, model, plots."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hiermodel.durable_files import sync_folder
from hiermodel.errors import DataError
from hiermodel.jobs import DATA_FILE, MODEL_DIR, write_json
from hiermodel.model import CONFIG_FILE, HierModel
from hiermodel.plots import plot_series
from hiermodel.run_config import RunConfig
from server.ledger import EPSILON_PLOT, LEDGER_FILE

CONFIG_FILE_NAME = "run_config.json"
RESULTS_FILE = "results.json"
CENTRAL_PRIVACY_FILE = "central_privacy.json"  # central DP's spend so far (server.central_privacy)
METRICS_PLOT, LAMBDA_PLOT = "metrics.png", "lambda.png"
# a checkpoint's arrays of the server optimizer (FedAdam's moments), beside the model's: no parameter
# name has a slash
OPTIMIZER_PREFIX = "server-optimizer/"


class RunDirectory:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "checkpoints").mkdir(exist_ok=True)

    def set_aside_previous_run(self, log=None) -> Path | None:
        """A new run in a folder that holds an old one: move the old run's records into previous-<time>/
        (and say so with ``log``).

        Without this the new run would append to the old ledger and overwrite its checkpoints.
        """
        old = [self.folder / n for n in (RESULTS_FILE, LEDGER_FILE, CENTRAL_PRIVACY_FILE, "checkpoints", MODEL_DIR)]
        old = [p for p in old if p.exists() and not (p.is_dir() and not any(p.iterdir()))]
        if not old:
            return None  # a run_config.json alone is this run's (`hierfed simulate` writes it first)
        # the old run's settings (audit and resume read them) and its plots go with its records
        old += [p for p in (self.folder / n for n in (CONFIG_FILE_NAME, METRICS_PLOT, LAMBDA_PLOT, EPSILON_PLOT))
                if p.exists()]
        target = self.folder / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        target.mkdir()
        for path in old:
            os.replace(path, target / path.name)
        (self.folder / "checkpoints").mkdir(exist_ok=True)
        if log is not None:
            log(f"{self.folder} held an earlier run: moved its results, ledger, checkpoints, model and settings "
                f"to {target.name}/")
        return target

    def write_config(self, config: RunConfig) -> None:
        write_json(self.folder / CONFIG_FILE_NAME, config.to_flat())

    def read_config(self) -> RunConfig:
        """The run config the run was started with (for resuming it)."""
        path = self.folder / CONFIG_FILE_NAME
        try:
            flat = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path} not found: {self.folder} holds no run to resume; start a new run there instead") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is unreadable ({exc}); it is needed to resume the run") from None
        return RunConfig.from_flat(flat)

    def read_results(self) -> dict:
        path = self.folder / RESULTS_FILE
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is unreadable ({exc}); restore it to resume (it is written atomically, "
                            "so this is damage from outside the run)") from None

    def checkpoint_path(self, server_round: int) -> Path:
        return self.folder / "checkpoints" / f"round-{server_round:04d}.safetensors"

    def checkpoint(self, server_round: int, state: dict[str, np.ndarray],
                   optimizer: dict[str, np.ndarray] | None = None) -> dict[str, str]:
        """The global trainable state after a round, and the server optimizer's state (under
        OPTIMIZER_PREFIX), as safetensors: temporary file, fsync, rename.

        Returns the file name and its SHA-256, which the round's results row keeps to check it later.
        """
        path = self.checkpoint_path(server_round)
        tmp = path.with_suffix(".tmp")
        arrays = {**state, **{OPTIMIZER_PREFIX + k: v for k, v in (optimizer or {}).items()}}
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(tmp))
        digest = file_sha256(tmp, sync=True)
        os.replace(tmp, path)
        sync_folder(path.parent)
        return {"file": f"checkpoints/{path.name}", "sha256": digest}

    def load_checkpoint(self, server_round: int, sha256: str) -> dict[str, np.ndarray]:
        """A round's checkpoint, after checking it against its SHA-256; DataError when it does not match.
        The server optimizer's arrays, if any, are among them under OPTIMIZER_PREFIX (split_checkpoint)."""
        path = self.checkpoint_path(server_round)
        try:
            digest = file_sha256(path)
        except OSError as exc:
            raise DataError(f"checkpoint {path} is missing or unreadable ({exc})") from None
        if digest != sha256:
            raise DataError(f"checkpoint {path} fails its checksum (truncated or damaged)")
        try:
            return {k: v.numpy() for k, v in load_file(str(path)).items()}
        except (SafetensorError, OSError) as exc:
            raise DataError(f"checkpoint {path} is not a readable safetensors file ({exc})") from None

    def write_results(self, results: dict) -> None:
        write_json(self.folder / RESULTS_FILE, results)

    def write_model(self, model: HierModel, config: RunConfig) -> Path:
        """The final global model, loadable by `hierfed evaluate --model RUN_DIR`."""
        folder = self.folder / MODEL_DIR
        model.save_pretrained(folder)
        write_json(folder / DATA_FILE, dataclasses.asdict(config.data))
        return folder / CONFIG_FILE

    def plot(self, rounds: list[dict], *, site_split: str = "validation") -> list[Path]:
        """Metrics per round and λ per level per round (per site where λ is personal)."""
        paths = []
        x = [r["round"] for r in rounds]
        metric_lines: dict[str, dict[str, list[float]]] = {}
        labels = {"server_evaluate": "server, held-out test", "client_evaluate": f"sites, their {site_split}"}
        for source, label in labels.items():
            for name in ("ndcg@10", "recall@20", "explore_recall@20"):
                values = [r.get(source, {}).get(name) for r in rounds]
                if all(v is not None for v in values) and values:
                    metric_lines.setdefault(name, {})[label] = values
        loss = [r.get("train", {}).get("loss") for r in rounds]
        panels = {"train loss": {"loss": loss}} if all(v is not None for v in loss) else {}
        panels.update(metric_lines)
        if panels:
            paths.append(plot_series(self.folder / METRICS_PLOT, x=x, panels=panels, xlabel="round"))
        lambdas = _lambda_lines(rounds)
        if lambdas:
            paths.append(plot_series(self.folder / LAMBDA_PLOT, x=x, panels=lambdas, xlabel="round"))
        return paths


def split_checkpoint(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A checkpoint's model state and its server optimizer's state."""
    state = {k: v for k, v in arrays.items() if not k.startswith(OPTIMIZER_PREFIX)}
    return state, {k[len(OPTIMIZER_PREFIX):]: v for k, v in arrays.items() if k.startswith(OPTIMIZER_PREFIX)}


def file_sha256(path: Path, *, sync: bool = False) -> str:
    """SHA-256 of a file's bytes (and, with ``sync``, flush it to disk first)."""
    digest = hashlib.sha256()
    with open(path, "rb+" if sync else "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lambda_lines(rounds: list[dict]) -> dict[str, dict[str, list[float]]]:
    """λ per level: one panel per level, a line for the global λ and one per site that reported λ."""
    panels: dict[str, dict[str, list[float]]] = {}
    for r in rounds:
        for site, metrics in r.get("sites", {}).items():
            for key, value in metrics.items():
                if key.startswith("lambda-"):
                    panels.setdefault(f"λ {key[7:]}", {}).setdefault(site, []).append(float(value))
    return panels
