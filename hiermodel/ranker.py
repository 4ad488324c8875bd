"""The trained model as a Ranker: full-catalogue scores through the same path as the baselines."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hiermodel.data.dataset import Dataset
from hiermodel.data.split import Example
from hiermodel.features import FeatureBuilder
from hiermodel.model import HierModel, HierModelOutput


class HierRanker:
    """Scores every catalogue item for each example with a HierModel (in eval mode, no gradients)."""

    def __init__(self, model: HierModel, builder: FeatureBuilder, *, batch_size: int = 128, name: str = "hiermodel") -> None:
        self.model = model
        self.builder = builder
        self.batch_size = batch_size
        self.name = name

    @torch.no_grad()
    def outputs(self, examples: Sequence[Example]) -> HierModelOutput:
        """The model's full output on one batch of examples (scores over the whole catalogue)."""
        self.model.eval()
        history, candidates = self.builder.ranking_batch(examples)
        return self.model(history, candidates)

    def score(self, dataset: Dataset, examples: Sequence[Example]) -> np.ndarray:
        if dataset is not self.builder.dataset:
            raise ValueError("HierRanker scores the dataset its feature builder was made for")
        out = np.empty((len(examples), dataset.num_items), dtype=np.float32)
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start : start + self.batch_size]
            out[start : start + len(chunk)] = self.outputs(chunk).scores.numpy()
        return out
