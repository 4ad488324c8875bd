"""The global model on the server: its full config, the initial trainable state, and the optional
evaluation of each round's global state on held-out users."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hiermodel.backbone import resolve_backbone
from hiermodel.data.store import load_dataset_folder
from hiermodel.errors import ConfigError
from hiermodel.evaluation import evaluate_ranker
from hiermodel.features import feature_config
from hiermodel.model import HierModel, HierModelConfig
from hiermodel.pipeline import new_model, prepare
from hiermodel.private_popularity import PopularityRelease, release_popularity
from hiermodel.privacy import release_noise
from hiermodel.ranker import HierRanker
from hiermodel.run_config import RunConfig


def server_model_config(config: HierModelConfig) -> HierModelConfig:
    """Sizes the server can know without data: the backbone's width (from its config file only)."""
    from transformers import AutoConfig

    try:
        width = AutoConfig.from_pretrained(resolve_backbone(config.backbone)).hidden_size
    except OSError as exc:
        raise ConfigError(f"cannot read the config of backbone {config.backbone!r}: {exc}") from None
    if config.topic_label and not config.num_topics:
        raise ConfigError("model.topic-label needs model.num-topics on the server (the number of label values)")
    return feature_config(dataclasses.replace(config, backbone_dim=int(width)))


def _private_features(dataset, config: RunConfig) -> dict:
    """Under DP the held-out users stand for one more site: their features get what a site's get,
    a DP popularity release (or none), never the plain counts."""
    if not config.dp.enabled:
        return {}
    dp = config.dp
    if not (config.model.use_popularity and dp.popularity_share and dp.popularity_weeks):
        return {"popularity": PopularityRelease.empty(dataset.num_items)}
    delta = dp.target_delta or 1.0 / (10 * max(len(dataset.users), 1))
    # made anew whenever the server starts (a resume too), on the held-out users only, and used for
    # the server's evaluation only: it is recorded nowhere and never leaves the server
    return {"popularity": release_popularity(dataset, release_noise(dp, delta=delta), start=dp.popularity_start,
                                             weeks=dp.popularity_weeks)}


class GlobalModel:
    def __init__(self, config: RunConfig) -> None:
        self.run_config = config
        self.config = server_model_config(config.model)
        self.model: HierModel = new_model(self.config, seed=config.train.seed)
        self._ranker: HierRanker | None = None
        if config.fed.server_eval_data:
            dataset = load_dataset_folder(Path(config.fed.server_eval_data))
            eval_config, builder = prepare(dataset, config.model, progress=False, **_private_features(dataset, config))
            if eval_config != self.config:
                raise ConfigError("the server's evaluation data implies another model shape than the run config")
            self._ranker = HierRanker(self.model, builder)

    def initial_state(self) -> dict[str, np.ndarray]:
        return self.model.trainable_state()

    def load(self, state: dict[str, np.ndarray]) -> HierModel:
        self.model.load_trainable_state(state)
        return self.model

    def evaluate(self, state: dict[str, np.ndarray]) -> dict[str, float]:
        """Test metrics of ``state`` on the held-out users, if the run names them."""
        if self._ranker is None:
            return {}
        self.load(state)
        metrics = evaluate_ranker(self._ranker, self._ranker.builder.dataset, split="test")
        return {k: float(v) for k, v in metrics.items()}
