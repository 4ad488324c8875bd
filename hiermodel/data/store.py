"""Save a Dataset to a folder and read it back unchanged: how partitions reach simulated sites.

Format: items.parquet (item_id, text, one column per label) and baskets.parquet (user_id, site,
timestamp, items, shown), one row per basket in user then time order; meta.json names the set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hiermodel.data.dataset import Basket, Catalogue, Dataset, User
from hiermodel.errors import DataError, quoted

ITEMS_FILE = "items.parquet"
BASKETS_FILE = "baskets.parquet"
META_FILE = "meta.json"
MANIFEST = "partitions.json"  # a folder of saved partitions: which site each numbered folder holds
_LABEL_PREFIX = "label:"


def is_dataset_folder(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / BASKETS_FILE).is_file()


def save_dataset(dataset: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = pd.DataFrame({"item_id": dataset.catalogue.item_ids, "text": dataset.catalogue.texts})
    for name, values in dataset.catalogue.labels.items():
        items[_LABEL_PREFIX + name] = values
    items.to_parquet(folder / ITEMS_FILE, index=False)
    rows = [
        (u.user_id, u.site, b.timestamp, b.items, b.shown)
        for u in dataset.users
        for b in u.baskets
    ]
    baskets = pd.DataFrame(rows, columns=["user_id", "site", "timestamp", "items", "shown"])
    baskets.to_parquet(folder / BASKETS_FILE, index=False)
    (folder / META_FILE).write_text(json.dumps({"name": dataset.name, "skipped": dataset.skipped}))
    return folder


def load_dataset_folder(folder: Path) -> Dataset:
    if not is_dataset_folder(folder):
        raise DataError(f"{folder} is not a saved hierfed data set ({META_FILE} + {BASKETS_FILE}); prepare it again")
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        items = pd.read_parquet(folder / ITEMS_FILE)
        baskets = pd.read_parquet(folder / BASKETS_FILE)
    except (OSError, ValueError) as exc:
        raise _damaged(folder, f"cannot read it ({_first_line(exc)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("skipped", {}), dict):
        raise _damaged(folder, f"{META_FILE} is not an object with a name and skipped counts")
    missing = [f"{ITEMS_FILE}:{c}" for c in ("item_id", "text") if c not in items.columns]
    missing += [f"{BASKETS_FILE}:{c}" for c in _BASKET_COLUMNS if c not in baskets.columns]
    if missing:
        raise _damaged(folder, f"missing column(s) {', '.join(missing)}")
    if baskets["user_id"].isna().any() or baskets["site"].isna().any():
        raise _damaged(folder, f"{BASKETS_FILE} has a basket without user_id or site")
    labels = {c[len(_LABEL_PREFIX):]: items[c].astype(str).tolist() for c in items.columns if c.startswith(_LABEL_PREFIX)}
    catalogue = Catalogue(items["item_id"].astype(str).tolist(), items["text"].astype(str).tolist(), labels)
    users: list[User] = []
    for (user_id, site), group in baskets.groupby(["user_id", "site"], sort=False):
        try:
            user_baskets = [
                Basket(float(ts), _indices(it, len(catalogue)), None if shown is None else _indices(shown, len(catalogue)))
                for ts, it, shown in zip(group["timestamp"], group["items"], group["shown"])
            ]
        except (TypeError, ValueError) as exc:
            raise _damaged(folder, f"user {quoted(str(user_id))}: {_first_line(exc)}") from None
        if not all(np.isfinite(b.timestamp) for b in user_baskets):
            raise _damaged(folder, f"user {quoted(str(user_id))} has a basket without a valid timestamp")
        users.append(User(str(user_id), str(site), sorted(user_baskets, key=lambda b: b.timestamp)))
    if len({u.user_id for u in users}) != len(users):
        raise _damaged(folder, "a user_id appears under two sites")
    name = meta.get("name")
    return Dataset(name if isinstance(name, str) else folder.name, catalogue, users, dict(meta.get("skipped", {})))


_BASKET_COLUMNS = ("user_id", "site", "timestamp", "items", "shown")


def _damaged(folder: Path, what: str) -> DataError:
    return DataError(f"{folder}: damaged saved data set: {what}; prepare it again (hierfed simulate --prepare-only)")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return quoted(text.splitlines()[0], 120)[1:-1] if text else type(exc).__name__


def _indices(values, num_items: int) -> np.ndarray:
    """A basket's item indices as int64; ValueError unless each is an index into the catalogue."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"item indices {quoted(values)} are not a list of integers")
    indices = np.asarray(values, dtype=np.int64)
    if indices.ndim != 1 or ((indices < 0) | (indices >= num_items)).any():
        raise ValueError(f"item indices outside the catalogue of {num_items} items")
    return indices


def read_manifest(folder: Path) -> list[dict]:
    """The partition manifest of a folder of saved partitions (partition, site, users, path)."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the partition manifest ({_first_line(exc)}); prepare the partitions again") from None
    kinds = {"partition": int, "site": str, "users": int, "path": str}
    for entry in manifest if isinstance(manifest, list) else [None]:
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), t) and not isinstance(entry.get(k), bool) for k, t in kinds.items()
        )
        if not ok or entry["partition"] < 0 or entry["users"] < 0 or not entry["site"]:
            raise DataError(
                f"{path}: not a partition manifest (a list of {{partition, site, users, path}}, found "
                f"{quoted(entry)}); prepare the partitions again"
            )
    return manifest
