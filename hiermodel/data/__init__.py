"""Behaviour data: loaders for every supported format into the one internal form (see dataset.py)."""

from __future__ import annotations

from pathlib import Path

from hiermodel.data.dataset import Basket, Catalogue, Dataset, User, build_users
from hiermodel.data.interactions import find_table, load_interactions
from hiermodel.data.mind import load_mind
from hiermodel.data.uci_retail import (
    find_online_retail,
    is_online_retail_table,
    load_online_retail,
    retail_file_in,
)
from hiermodel.data.store import is_dataset_folder, load_dataset_folder, save_dataset
from hiermodel.data.split import SPLITS, Example, split_examples, train_popularity, train_targets_by_user
from hiermodel.data.synthetic import SyntheticConfig, generate_synthetic
from hiermodel.errors import DataError

__all__ = [
    "SPLITS",
    "Basket",
    "Catalogue",
    "Dataset",
    "Example",
    "SyntheticConfig",
    "User",
    "build_users",
    "find_online_retail",
    "generate_synthetic",
    "load_dataset",
    "load_interactions",
    "load_mind",
    "load_online_retail",
    "load_dataset_folder",
    "save_dataset",
    "split_examples",
    "train_popularity",
    "train_targets_by_user",
]

ACCEPTED = (
    "'synthetic', 'online-retail', a folder with interactions.csv|.parquet + items.csv|.parquet, "
    "a folder with MIND's news.tsv + behaviors.tsv, or an Online Retail table file (.csv, .csv.xz, .xlsx)"
)


def _load_path(path: Path, *, session_gap_minutes: float) -> Dataset:
    """Load a file or folder, telling the format by what it holds."""
    if path.is_file():
        if path.suffix.lower() == ".xlsx" or is_online_retail_table(path):
            return load_online_retail(path)
        raise DataError(
            f"{path}: not an Online Retail table (its header lacks InvoiceNo, StockCode, InvoiceDate, CustomerID); "
            f"for an interactions table pass its folder. Accepted: {ACCEPTED}"
        )
    if is_dataset_folder(path):  # a partition that `hierfed simulate` prepared
        return load_dataset_folder(path)
    generic = find_table(path, "interactions") is not None
    # One MIND file alone still means MIND: its loader then names the missing one.
    mind = (path / "news.tsv").is_file() or (path / "behaviors.tsv").is_file()
    if generic and mind:
        raise DataError(
            f"{path}: holds both interactions.* and MIND's news.tsv/behaviors.tsv; keep one format per folder"
        )
    if generic:
        return load_interactions(path, session_gap_minutes=session_gap_minutes)
    if mind:
        return load_mind(path)
    if (retail := retail_file_in(path)) is not None:
        return load_online_retail(retail)
    raise DataError(f"{path}: no data set found in this folder; accepted: {ACCEPTED}")


def load_dataset(
    spec: str,
    *,
    data_path: str | None = None,
    session_gap_minutes: float = 30.0,
    synthetic: SyntheticConfig | None = None,
) -> Dataset:
    """The data set named by ``spec``: 'synthetic', 'online-retail' or a path (format told by contents)."""
    if spec == "synthetic":
        return generate_synthetic(synthetic)
    if spec == "online-retail":
        return load_online_retail(find_online_retail(data_path))
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"unknown data set {spec!r} (no such name, file or folder); accepted: {ACCEPTED}")
    return _load_path(path, session_gap_minutes=session_gap_minutes)
