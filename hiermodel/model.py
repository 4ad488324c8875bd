"""HierModel: the hierarchical user-interest recommender over a frozen LM's cached encodings.

Trainable: the level heads, the combiner λ and the scorer (item tower + feature MLP). The backbone
is not part of this module at all; it only produced the cached encodings in the batches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hiermodel.batch import CandidateBatch, HistoryBatch
from hiermodel.combiner import Combiner
from hiermodel.errors import ConfigError
from hiermodel.levels import LevelOutput, ParagraphLevel, SentenceLevel, WordLevel
from hiermodel.losses import softmax_loss, topic_loss
from hiermodel.scorer import Scorer

LEVEL_NAMES = ("word", "sentence", "paragraph")
# The few values that weigh the text interest against the repeat, popularity and similarity features.
# Under DP they get a share of the clip norm of their own (dp.head-clip-share): otherwise the item
# tower's gradient, most of a user's gradient norm, leaves them a sliver of it after clipping.
HEAD_PREFIXES = ("combiner.", "scorer.wide.", "scorer.hidden.", "scorer.output.")
# The three backbone -> d projections of the text (tokens, sentences, candidates): 60 % of the values.
PROJECTION_PREFIXES = ("word.proj.", "sentence.sentence_proj.", "scorer.item_tower.")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class HierModelConfig:
    """Shapes and switches of the model; saved beside the weights as config.json."""

    backbone: str = "default"
    backbone_dim: int = 384
    max_tokens: int = 16
    dim: int = 64
    num_levels: int = 3
    combiner: str = "learned"
    fixed_lambda: list[float] | None = None
    max_history_items: int = 64
    max_baskets: int = 16
    max_basket_items: int = 32
    scorer_hidden: int = 64
    text_scale: float = 10.0
    use_repeat: bool = True
    use_popularity: bool = True  # item popularity pools every user of a site: under user-level DP, its DP release
    text_similarity: bool = False  # the zero-shot backbone cosine of candidate and history as a wide feature
    level_loss_weight: float = 0.3
    num_topics: int = 0
    topic_label: str | None = None
    topic_loss_weight: float = 0.1
    num_repeat_features: int = 6
    num_features: int = 12  # feature_config sets it from the feature builder
    stats_dim: int = 6
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.num_levels <= 3:
            raise ConfigError(f"model.num-levels must be 1, 2 or 3, got {self.num_levels}")
        if self.dim < 1 or self.max_history_items < 1 or self.max_baskets < 1 or self.max_basket_items < 1:
            raise ConfigError("model dimensions and history limits must be positive integers")


@dataclass
class HierModelOutput:
    loss: torch.Tensor | None  # () mean over users
    per_user_loss: torch.Tensor | None  # (B,)
    scores: torch.Tensor  # (B, C) final scores
    level_scores: torch.Tensor  # (B, L, C) each level's text score alone
    lambdas: torch.Tensor  # (B, L)
    attention: dict[str, torch.Tensor]  # word (B, H, T), sentence (B, H), paragraph (B, K)


class HierModel(nn.Module):
    def __init__(self, config: HierModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.word = WordLevel(c.backbone_dim, c.dim, max_tokens=c.max_tokens, build_items=c.num_levels >= 2)
        self.sentence = (
            SentenceLevel(c.backbone_dim, c.dim, c.stats_dim, build_baskets=c.num_levels >= 3) if c.num_levels >= 2 else None
        )
        self.paragraph = ParagraphLevel(c.dim, c.max_baskets) if c.num_levels >= 3 else None
        self.combiner = Combiner(c.num_levels, mode=c.combiner, fixed=c.fixed_lambda)
        self.scorer = Scorer(
            backbone_dim=c.backbone_dim,
            dim=c.dim,
            num_features=c.num_features,
            hidden=c.scorer_hidden,
            text_scale=c.text_scale,
        )
        self.topic_heads = (
            nn.ModuleList(nn.Linear(c.dim, c.num_topics) for _ in range(c.num_levels)) if c.num_topics else None
        )

    @property
    def level_names(self) -> tuple[str, ...]:
        return LEVEL_NAMES[: self.config.num_levels]

    def levels(self, history: HistoryBatch) -> list[LevelOutput]:
        """z^(1) … z^(k), each level built from the units of the one below."""
        out = [self.word(history)]
        if self.sentence is not None:
            out.append(self.sentence(history, out[-1].units))
        if self.paragraph is not None:
            out.append(self.paragraph(history, out[-1].units))
        return out

    def forward(self, history: HistoryBatch, candidates: CandidateBatch) -> HierModelOutput:
        levels = self.levels(history)
        users = torch.stack([lv.user for lv in levels], dim=1)  # (B, L, d)
        z, lam = self.combiner(users)  # (B, d), (B, L)
        # each level's and the combined z's cosines to the candidates in one product (one hook under DP)
        cosines = self.scorer.text_scores(torch.cat([users, z.unsqueeze(1)], dim=1), candidates.sentence)  # (B, L + 1, C)
        level_scores, text = cosines[:, :-1], cosines[:, -1]  # (B, L, C), (B, C)
        features = candidates.features
        if not self.config.use_repeat:  # ablation: the model sees no repeat statistics
            features = torch.cat(
                [torch.zeros_like(features[..., : self.config.num_repeat_features]),
                 features[..., self.config.num_repeat_features :]],
                dim=-1,
            )
        scores = self.scorer(text, features)
        attention = {name: lv.attention for name, lv in zip(self.level_names, levels)}
        loss = per_user = None
        if candidates.labels is not None:
            per_user = softmax_loss(scores, candidates.labels, candidates.mask)
            if self.config.level_loss_weight:
                for level in range(level_scores.shape[1]):
                    per_user = per_user + self.config.level_loss_weight * softmax_loss(
                        level_scores[:, level], candidates.labels, candidates.mask
                    )
            if self.topic_heads is not None and candidates.topic_targets is not None:
                for head, user in zip(self.topic_heads, users.unbind(1)):
                    per_user = per_user + self.config.topic_loss_weight * topic_loss(
                        head(user), candidates.topic_targets
                    )
            loss = per_user.mean()
        return HierModelOutput(loss, per_user, scores, level_scores, lam, attention)

    # --- the trainable state: exactly what crosses the wire in federated training ---

    def trainable_state(self) -> dict[str, np.ndarray]:
        """Every trainable parameter as a float32 numpy array, by name, in a fixed order."""
        return {n: p.detach().cpu().numpy().copy() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        """Load arrays produced by trainable_state(); keys and shapes must match exactly."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"trainable state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                tensor = torch.as_tensor(np.asarray(value))
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(f"trainable state {name}: shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
                params[name].copy_(tensor)

    def head_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters named by HEAD_PREFIXES."""
        return [p for n, p in self.named_parameters() if p.requires_grad and n.startswith(HEAD_PREFIXES)]

    def projection_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters named by PROJECTION_PREFIXES."""
        return [p for n, p in self.named_parameters() if p.requires_grad and n.startswith(PROJECTION_PREFIXES)]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save_pretrained(self, folder: Path | str) -> None:
        """The trainable state as safetensors plus config.json (the fixed λ lives in the config)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        if self.config.combiner != "learned":
            config["fixed_lambda"] = self.combiner.fixed_lambda.tolist()
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file({k: torch.from_numpy(v) for k, v in self.trainable_state().items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: Path | str) -> "HierModel":
        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
            raise ConfigError(f"{folder} holds no hierfed model ({CONFIG_FILE} + {WEIGHTS_FILE}); pass the folder `hierfed train` wrote")
        try:
            config = HierModelConfig(**json.loads((folder / CONFIG_FILE).read_text()))
            model = cls(config)
            model.load_trainable_state({k: v.numpy() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()})
        except (TypeError, ValueError, OSError) as exc:
            raise ConfigError(f"cannot load the model in {folder} ({exc}); it may come from another hierfed version, train it again") from None
        model.eval()
        return model
