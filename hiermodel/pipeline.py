"""Wires a dataset to the model: encodings from the cache, the feature builder and a fresh model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hiermodel.data.dataset import Dataset
from hiermodel.errors import ConfigError
from hiermodel.encoding_cache import ItemEncodings, encode_catalogue
from hiermodel.features import FeatureBuilder, feature_config
from hiermodel.model import HierModel, HierModelConfig


def model_config_for(dataset: Dataset, config: HierModelConfig, encodings: ItemEncodings) -> HierModelConfig:
    """The config with the sizes that follow from the data and the backbone filled in."""
    config = feature_config(dataclasses.replace(config, backbone_dim=encodings.dim, max_tokens=encodings.max_tokens))
    if config.topic_label:
        labels = dataset.catalogue.labels.get(config.topic_label)
        if labels is None:
            raise ConfigError(
                f"model.topic-label={config.topic_label!r} but the data set has labels {sorted(dataset.catalogue.labels) or 'none'}"
            )
        config.num_topics = len(set(labels))
    return config


def prepare(
    dataset: Dataset,
    config: HierModelConfig,
    *,
    cache_root: Path | None = None,
    popularity=None,
    progress: bool = True,
) -> tuple[HierModelConfig, FeatureBuilder]:
    """Encode the catalogue (cached) and build the feature builder; returns the completed config too.
    ``popularity`` goes to the FeatureBuilder (None: the plain features of ``dataset``)."""
    encodings = encode_catalogue(
        dataset.catalogue.texts,
        backbone=config.backbone,
        max_tokens=config.max_tokens,
        cache_root=cache_root,
        progress=progress,
    )
    config = model_config_for(dataset, config, encodings)
    builder = FeatureBuilder(dataset=dataset, encodings=encodings, config=config, popularity=popularity)
    return config, builder


def new_model(config: HierModelConfig, *, seed: int = 0) -> HierModel:
    torch.manual_seed(seed)
    return HierModel(config)
