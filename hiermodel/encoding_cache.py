"""On-disk cache of backbone encodings: each item text is encoded once per model, then memory-mapped.

Layout of one cache (one folder per backbone fingerprint and token length):
  meta.json      model fingerprint, dims, and the number of committed rows
  keys.txt       one text hash per committed row
  tokens.f16     (rows, T, D) token states, float16
  mask.u8        (rows, T) token presence
  sentence.f16   (rows, D) pooled sentence vectors, float16
Rows are appended; meta.json is replaced atomically after the data is flushed, so a crash while
encoding leaves at most unreferenced bytes that the next run truncates. meta.json keeps a SHA-256
per appended segment of every file (and of keys.txt), checked when a cache is opened: a truncated
or damaged cache is reported, set aside (renamed, not deleted) and rebuilt, never read.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hiermodel.backbone import FrozenBackbone
from hiermodel.durable_files import atomic_write_text
from hiermodel.errors import DataError

logger = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """$HIERFED_CACHE, else ~/.cache/hierfed/encodings."""
    env = os.environ.get("HIERFED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hierfed" / "encodings"


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ItemEncodings:
    """Encodings of a catalogue, by internal item index (views on the memory-mapped cache)."""

    token_states: torch.Tensor  # (N, T, D) float16
    token_mask: torch.Tensor  # (N, T) bool
    sentence: torch.Tensor  # (N, D) float16

    @property
    def num_items(self) -> int:
        return int(self.sentence.shape[0])

    @property
    def dim(self) -> int:
        return int(self.sentence.shape[1])

    @property
    def max_tokens(self) -> int:
        return int(self.token_mask.shape[1])


class EncodingCache:
    """The encodings of every text a backbone has seen, kept on disk and shared between runs and sites."""

    def __init__(self, backbone: FrozenBackbone, root: Path | None = None) -> None:
        self.backbone = backbone
        self.folder = (root or default_cache_root()) / f"{backbone.fingerprint}-T{backbone.max_tokens}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock_path = self.folder.with_name(self.folder.name + ".lock")  # beside it: outlives setting it aside
        with self._locked():
            self.rows, self.keys = self._read_committed()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time checks, truncates or appends (sites and runs share a cache); readers
        of committed rows need no lock, as committed bytes never change."""
        with open(self.lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_committed(self) -> tuple[int, dict[str, int]]:
        if not (self.folder / "meta.json").exists():
            return 0, {}
        problem, rows, keys = self._check()
        if problem:
            aside = self.folder.with_name(f"{self.folder.name}.damaged-{int(time.time() * 1000)}")
            os.replace(self.folder, aside)
            self.folder.mkdir(parents=True)
            message = f"encoding cache {self.folder}: {problem}; set it aside as {aside.name} and rebuilding it"
            logger.warning(message)
            print(f"hierfed: warning: {message}", flush=True)
            return 0, {}
        return rows, {k: i for i, k in enumerate(keys)}

    def _check(self) -> tuple[str | None, int, list[str]]:
        """What is wrong with the cache on disk (None when nothing), its committed rows and keys."""
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
            rows, segments = int(meta["rows"]), list(meta["segments"])
            segments = [(int(seg["rows"]), {str(k): str(v) for k, v in seg["sha256"].items()}) for seg in segments]
            keys_text = (self.folder / "keys.txt").read_text()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"unreadable or written without checksums ({exc!r})", 0, []
        keys = keys_text.split()[:rows]  # keys past the committed rows: an append that did not finish
        if meta.get("fingerprint") != self.backbone.fingerprint or len(keys) != rows or \
                sum(n for n, _ in segments) != rows:
            return "its index does not match its rows", 0, []
        if _sha256(_keys_text(keys)) != meta.get("keys_sha256"):
            return "keys.txt fails its checksum", 0, []
        try:
            self._truncate(rows)
        except DataError as exc:
            return str(exc), 0, []
        t, d = self.backbone.max_tokens, self.backbone.dim
        for name, row_bytes in self._files(t, d).items():
            with open(self.folder / name, "rb") as f:
                for n, digests in segments:
                    if _sha256(f.read(n * row_bytes)) != digests.get(name):
                        return f"{name} fails its checksum (damaged)", 0, []
        return None, rows, keys

    def _truncate(self, rows: int) -> None:
        """Drop bytes past the committed rows (left by an interrupted append)."""
        t, d = self.backbone.max_tokens, self.backbone.dim
        for name, row_bytes in self._files(t, d).items():
            path = self.folder / name
            if path.exists() and path.stat().st_size > rows * row_bytes:
                with open(path, "r+b") as f:
                    f.truncate(rows * row_bytes)
            elif rows and (not path.exists() or path.stat().st_size < rows * row_bytes):
                raise DataError(f"{name} is truncated")

    @staticmethod
    def _files(t: int, d: int) -> dict[str, int]:
        return {"tokens.f16": t * d * 2, "mask.u8": t, "sentence.f16": d * 2}

    def encode_texts(self, texts: list[str], *, batch_size: int = 64, progress: bool = True) -> ItemEncodings:
        """Encodings for ``texts`` (in order), running the backbone only on texts not yet cached."""
        keys = [text_key(t) for t in texts]
        if any(k not in self.keys for k in keys):
            with self._locked():
                self.rows, self.keys = self._read_committed()  # another process may have added rows meanwhile
                missing = list(dict.fromkeys(k for k in keys if k not in self.keys))
                if missing:
                    by_key = dict(zip(keys, texts))
                    self._append([by_key[k] for k in missing], missing, batch_size=batch_size, progress=progress)
        rows = np.fromiter((self.keys[k] for k in keys), dtype=np.int64, count=len(keys))
        return self._view(rows)

    def _append(self, texts: list[str], keys: list[str], *, batch_size: int, progress: bool) -> None:
        files = {name: open(self.folder / name, "ab") for name in self._files(1, 1)}
        digests = {name: hashlib.sha256() for name in files}
        try:
            bar = tqdm(total=len(texts), desc="encoding items", unit="item", disable=not progress)
            for start in range(0, len(texts), batch_size):
                enc = self.backbone.encode(texts[start : start + batch_size])
                chunks = {"tokens.f16": enc.token_states.to(torch.float16), "mask.u8": enc.token_mask.to(torch.uint8),
                          "sentence.f16": enc.sentence.to(torch.float16)}
                for name, tensor in chunks.items():
                    data = tensor.numpy().tobytes()
                    files[name].write(data)
                    digests[name].update(data)
                bar.update(len(enc.sentence))
            bar.close()
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in files.values():
                f.close()
        all_keys = [*sorted(self.keys, key=self.keys.get), *keys]
        atomic_write_text(self.folder / "keys.txt", _keys_text(all_keys).decode("utf-8"))
        segments = self._segments() + [{"rows": len(keys), "sha256": {n: h.hexdigest() for n, h in digests.items()}}]
        meta = {
            "fingerprint": self.backbone.fingerprint,
            "backbone": self.backbone.name,
            "max_tokens": self.backbone.max_tokens,
            "dim": self.backbone.dim,
            "rows": len(all_keys),
            "keys_sha256": _sha256(_keys_text(all_keys)),
            "segments": segments,
        }
        atomic_write_text(self.folder / "meta.json", json.dumps(meta, indent=2))
        self.keys.update({k: self.rows + i for i, k in enumerate(keys)})
        self.rows = len(all_keys)

    def _segments(self) -> list[dict]:
        if not self.rows:
            return []
        return json.loads((self.folder / "meta.json").read_text())["segments"]

    def _view(self, rows: np.ndarray) -> ItemEncodings:
        t, d = self.backbone.max_tokens, self.backbone.dim
        if self.rows == 0:
            empty = torch.zeros(0)
            return ItemEncodings(empty.view(0, t, d).half(), empty.view(0, t).bool(), empty.view(0, d).half())
        tokens = np.memmap(self.folder / "tokens.f16", dtype=np.float16, mode="r", shape=(self.rows, t, d))
        mask = np.memmap(self.folder / "mask.u8", dtype=np.uint8, mode="r", shape=(self.rows, t))
        sentence = np.memmap(self.folder / "sentence.f16", dtype=np.float16, mode="r", shape=(self.rows, d))
        # Gathering copies only this catalogue's rows into memory (tens of MB for a retail catalogue).
        return ItemEncodings(
            token_states=torch.from_numpy(np.ascontiguousarray(tokens[rows])),
            token_mask=torch.from_numpy(np.ascontiguousarray(mask[rows]).astype(bool)),
            sentence=torch.from_numpy(np.ascontiguousarray(sentence[rows])),
        )


def _keys_text(keys: list[str]) -> bytes:
    return ("\n".join(keys) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=4)
def load_backbone(name_or_path: str, max_tokens: int) -> FrozenBackbone:
    """One backbone per process: simulated sites in one worker share it."""
    return FrozenBackbone(name_or_path, max_tokens=max_tokens)


_ENCODED: dict[tuple, ItemEncodings] = {}


def encode_catalogue(
    texts: list[str], *, backbone: str = "default", max_tokens: int = 16, cache_root: Path | None = None,
    progress: bool = True,
) -> ItemEncodings:
    """The catalogue's encodings, running the backbone only on texts the cache does not hold yet.

    Within a process the result is kept, so sites that share a catalogue share one copy in memory.
    """
    model = load_backbone(backbone, max_tokens)
    root = cache_root or default_cache_root()
    key = (model.fingerprint, max_tokens, str(root), hashlib.sha1("\n".join(texts).encode("utf-8")).hexdigest())
    if key not in _ENCODED:
        _ENCODED.clear()  # one catalogue at a time is what a site needs; don't grow without bound
        _ENCODED[key] = EncodingCache(model, root).encode_texts(texts, progress=progress)
    return _ENCODED[key]
