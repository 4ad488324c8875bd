"""Which data a site trains on: a deployed SuperNode names it in its node config, a simulated one
finds its prepared partition by partition-id. Sites are built once per process and kept."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hiermodel.errors import ConfigError
from hiermodel.heap import reuse_freed_memory
from hiermodel.run_config import RunConfig
from hiermodel.site_trainer import SiteTrainer

_SITES: dict[tuple[str, str], SiteTrainer] = {}


def site_data_path(node_config: dict, config: RunConfig) -> tuple[str, int]:
    """The site's data path and its index (partition-id, or the node config's site-index)."""
    if "data-path" in node_config:
        return str(node_config["data-path"]), int(node_config.get("site-index", 0))
    if "partition-id" in node_config and config.fed.partitions_dir:
        pid = int(node_config["partition-id"])
        path = Path(config.fed.partitions_dir) / str(pid)
        if not path.exists():
            raise ConfigError(f"partition {pid} not found in {config.fed.partitions_dir}; prepare the partitions first")
        return str(path), pid
    raise ConfigError("this SuperNode has no data: start it with --node-config 'data-path=\"...\"' (or run a simulation)")


def site_trainer(node_config: dict, config: RunConfig) -> tuple[SiteTrainer, int]:
    """The site's trainer, built on first use in this process and reused in later rounds."""
    path, index = site_data_path(node_config, config)
    key = (path, json.dumps(dataclasses.asdict(config.model), sort_keys=True), config.dp.enabled)
    if key not in _SITES:
        reuse_freed_memory()  # this site's process: a Ray worker, or a SuperNode's ClientApp
        _SITES[key] = SiteTrainer(dataclasses.replace(config.data, dataset=path).load(), config.model,
                                  private=config.dp.enabled)
    return _SITES[key], index
