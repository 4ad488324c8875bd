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
from hiermodel.errors import DataError

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
        meta = json.loads((folder / META_FILE).read_text())
        items = pd.read_parquet(folder / ITEMS_FILE)
        baskets = pd.read_parquet(folder / BASKETS_FILE)
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder}: cannot read the saved data set ({exc}); prepare it again") from None
    labels = {c[len(_LABEL_PREFIX):]: items[c].astype(str).tolist() for c in items.columns if c.startswith(_LABEL_PREFIX)}
    catalogue = Catalogue(items["item_id"].astype(str).tolist(), items["text"].astype(str).tolist(), labels)
    users: list[User] = []
    for (user_id, site), group in baskets.groupby(["user_id", "site"], sort=False):
        users.append(
            User(
                str(user_id),
                str(site),
                [
                    Basket(float(ts), np.asarray(it, dtype=np.int64), None if shown is None else np.asarray(shown, dtype=np.int64))
                    for ts, it, shown in zip(group["timestamp"], group["items"], group["shown"])
                ],
            )
        )
    return Dataset(meta.get("name", folder.name), catalogue, users, dict(meta.get("skipped", {})))


def read_manifest(folder: Path) -> list[dict]:
    """The partition manifest of a folder of saved partitions (partition, site, users, path)."""
    return json.loads((folder / MANIFEST).read_text())
