"""The frozen backbone and the on-disk encoding cache."""

from __future__ import annotations

import json

import pytest
import torch

from hiermodel.backbone import FrozenBackbone
from hiermodel.encoding_cache import EncodingCache
from hiermodel.errors import ConfigError


def test_backbone_is_frozen_and_drops_special_tokens(tiny_backbone: str) -> None:
    backbone = FrozenBackbone(tiny_backbone, max_tokens=8)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training
    enc = backbone.encode(["white metal lantern", "a very long title " * 10])
    assert enc.token_states.shape == (2, 8, backbone.dim)
    # "white metal lantern" is 3 word pieces: [CLS]/[SEP]/padding are not kept
    assert enc.token_mask[0].tolist() == [True] * 3 + [False] * 5
    assert enc.token_mask[1].all()
    assert torch.allclose(enc.sentence.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_missing_backbone_folder_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        FrozenBackbone(str(tmp_path / "nope"))


def test_cache_encodes_each_text_once_and_reuses_it(tiny_backbone: str, tmp_path, monkeypatch) -> None:
    backbone = FrozenBackbone(tiny_backbone, max_tokens=8)
    calls = []
    original = backbone.encode
    monkeypatch.setattr(backbone, "encode", lambda texts: calls.append(list(texts)) or original(texts))
    cache = EncodingCache(backbone, tmp_path)
    first = cache.encode_texts(["red mug", "blue bag", "red mug"], progress=False)
    assert sum(len(c) for c in calls) == 2  # the duplicate is encoded once
    assert torch.equal(first.sentence[0], first.sentence[2])
    second = EncodingCache(backbone, tmp_path).encode_texts(["blue bag", "green box"], progress=False)
    assert sum(len(c) for c in calls) == 3  # only the new text ran through the backbone
    assert torch.equal(second.sentence[0], first.sentence[1])
    direct = original(["green box"])
    assert torch.allclose(second.sentence[1].float(), direct.sentence[0], atol=1e-2)
    assert second.token_states.dtype == torch.float16


def test_interrupted_append_is_truncated_and_bad_meta_refused(tiny_backbone: str, tmp_path) -> None:
    backbone = FrozenBackbone(tiny_backbone, max_tokens=8)
    cache = EncodingCache(backbone, tmp_path)
    cache.encode_texts(["red mug"], progress=False)
    with open(cache.folder / "sentence.f16", "ab") as f:  # bytes of a row that was never committed
        f.write(b"\0" * 10)
    again = EncodingCache(backbone, tmp_path)
    assert again.rows == 1
    assert (cache.folder / "sentence.f16").stat().st_size == backbone.dim * 2
    meta = json.loads((cache.folder / "meta.json").read_text())
    (cache.folder / "meta.json").write_text(json.dumps({**meta, "rows": 5}))
    rebuilt = EncodingCache(backbone, tmp_path)  # an index that does not match: set aside, rebuilt
    assert rebuilt.rows == 0 and len(list(tmp_path.glob(f"{cache.folder.name}.damaged-*"))) == 1


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "edit a key"])
def test_damaged_cache_is_reported_set_aside_and_rebuilt(tiny_backbone: str, tmp_path, capsys, damage) -> None:
    backbone = FrozenBackbone(tiny_backbone, max_tokens=8)
    texts = ["red mug", "blue bag", "green box"]
    cache = EncodingCache(backbone, tmp_path)
    cache.encode_texts(texts[:2], progress=False)
    good = cache.encode_texts(texts, progress=False)  # two segments
    target = cache.folder / ("keys.txt" if damage == "edit a key" else "tokens.f16")
    data = bytearray(target.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 3]
    else:
        data[0:1] = b"X" if data[0:1] != b"X" else b"Y"
    target.write_bytes(bytes(data))
    again = EncodingCache(backbone, tmp_path)
    assert again.rows == 0 and "set it aside" in capsys.readouterr().out
    aside = list(tmp_path.glob(f"{cache.folder.name}.damaged-*"))
    assert len(aside) == 1 and (aside[0] / target.name).read_bytes() == bytes(data)  # kept as it was, for a look
    rebuilt = again.encode_texts(texts, progress=False)
    assert torch.equal(rebuilt.sentence, good.sentence)
    assert EncodingCache(backbone, tmp_path).rows == 3  # and the rebuilt cache checks out


def test_writers_appending_at_once_leave_one_consistent_cache(tiny_backbone: str, tmp_path) -> None:
    import threading

    # each writer opens the cache on its own, as separate processes do: flock locks belong to an
    # open file, so they exclude each other within one process too
    backbone = FrozenBackbone(tiny_backbone, max_tokens=8)
    batches = [[f"{colour} item {i}" for i in range(40)] for colour in ("red", "blue", "green")]
    errors: list[BaseException] = []

    def encode(texts: list[str]) -> None:
        try:
            EncodingCache(backbone, tmp_path).encode_texts(texts, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's own thread
            errors.append(exc)

    writers = [threading.Thread(target=encode, args=(b,)) for b in batches]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=300)
    assert errors == []
    cache = EncodingCache(backbone, tmp_path)
    assert cache.rows == 120 and not list(tmp_path.glob("*.damaged-*"))  # every append kept, checksums hold
    assert len(cache.keys) == 120
