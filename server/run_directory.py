"""The run directory the server writes: run_config.json, results.json, checkpoints, model, plots."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hiermodel.jobs import DATA_FILE, MODEL_DIR, write_json
from hiermodel.model import CONFIG_FILE, HierModel
from hiermodel.plots import plot_series
from hiermodel.run_config import RunConfig


class RunDirectory:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "checkpoints").mkdir(exist_ok=True)

    def write_config(self, config: RunConfig) -> None:
        write_json(self.folder / "run_config.json", config.to_flat())

    def checkpoint(self, server_round: int, state: dict[str, np.ndarray]) -> Path:
        """The global trainable state after a round, as safetensors (written then renamed)."""
        path = self.folder / "checkpoints" / f"round-{server_round:04d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)
        return path

    def write_results(self, results: dict) -> None:
        write_json(self.folder / "results.json", results)

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
            paths.append(plot_series(self.folder / "metrics.png", x=x, panels=panels, xlabel="round"))
        lambdas = _lambda_lines(rounds)
        if lambdas:
            paths.append(plot_series(self.folder / "lambda.png", x=x, panels=lambdas, xlabel="round"))
        return paths


def _lambda_lines(rounds: list[dict]) -> dict[str, dict[str, list[float]]]:
    """λ per level: one panel per level, a line for the global λ and one per site that reported λ."""
    panels: dict[str, dict[str, list[float]]] = {}
    for r in rounds:
        for site, metrics in r.get("sites", {}).items():
            for key, value in metrics.items():
                if key.startswith("lambda-"):
                    panels.setdefault(f"λ {key[7:]}", {}).setdefault(site, []).append(float(value))
    return panels
