"""UCI Online Retail (dataset 352): invoices of a UK gift retailer -> sites (countries) of customers."""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from hiermodel.data.dataset import Catalogue, Dataset
from hiermodel.data.interactions import (
    dataset_from_events,
    parse_timestamps,
    read_table,
    require_columns,
    row_name,
)
from hiermodel.errors import DataError, quoted

RETAIL_COLUMNS = (
    "InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country",
)
# The columns that tell an Online Retail table apart from any other CSV.
_SIGNATURE = frozenset({"InvoiceNo", "StockCode", "InvoiceDate", "CustomerID"})
DEFAULT_FILE = "online_retail_full.csv.xz"
UCI_URL = "https://archive.ics.uci.edu/dataset/352/online+retail"
PRODUCT_CODE = r"^\d{5}"  # real products; drops POST, M, DOT, C2, PADS, BANK CHARGES, gift vouchers
# The CSV in ../shared writes '2010-12-01 08:26:00'; other exports of the UCI file use '12/1/2010 8:26'.
DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "ISO8601", "%m/%d/%Y %H:%M")
_CSV_SUFFIXES = (".csv", ".csv.xz", ".csv.gz", ".csv.bz2", ".csv.zip")


def _has_openpyxl() -> bool:
    return importlib.util.find_spec("openpyxl") is not None


def _read(path: Path) -> pd.DataFrame:
    """The raw table, every cell a string (CSV, compressed CSV, or .xlsx when openpyxl is installed)."""
    if path.suffix.lower() != ".xlsx":
        return read_table(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not _has_openpyxl():
        raise DataError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl); or convert the sheet to CSV")
    try:
        frame = pd.read_excel(path, dtype=str)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # a damaged .xlsx is a damaged zip
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read the workbook ({detail}); check that it is a valid .xlsx file") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise DataError(f"{path}: the table has no data rows")
    return frame


def _header(path: Path) -> set[str]:
    """A table file's column names, or an empty set where it cannot be read as a table."""
    try:
        if path.suffix.lower() == ".xlsx":
            columns = pd.read_excel(path, nrows=0).columns if _has_openpyxl() else []
        else:
            columns = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
    except Exception:  # any unreadable file is simply "not this format"
        return set()
    return {str(c).strip() for c in columns}


def is_online_retail_table(path: Path) -> bool:
    """Whether a file's header has the Online Retail columns (InvoiceNo, StockCode, ...)."""
    return path.is_file() and _SIGNATURE <= _header(path)


def retail_file_in(folder: Path) -> Path | None:
    """The Online Retail table in a folder or its online-retail/ subfolder, told by header (or .xlsx name)."""
    for place in (folder, folder / "online-retail"):
        if not place.is_dir():
            continue
        if (place / DEFAULT_FILE).is_file():
            return place / DEFAULT_FILE
        for candidate in sorted(p for p in place.iterdir() if p.is_file()):
            name = candidate.name.lower()
            if name.endswith(_CSV_SUFFIXES) and is_online_retail_table(candidate):
                return candidate
            # Without openpyxl a workbook's header cannot be read: trust the UCI file's name.
            if name.endswith(".xlsx") and (is_online_retail_table(candidate) or "retail" in name):
                return candidate
    return None


def find_online_retail(data_path: str | None) -> Path:
    """The Online Retail file: in data_path if given, else in $HIERFED_DATA or ../shared/data/online-retail."""
    if data_path:
        # An explicit path is authoritative: silently reading another copy would hide a typo.
        places = [Path(data_path).expanduser()]
    else:
        places = [Path(env).expanduser()] if (env := os.environ.get("HIERFED_DATA")) else []
        places += [
            Path.cwd().parent / "shared" / "data" / "online-retail",
            Path(__file__).resolve().parents[2].parent / "shared" / "data" / "online-retail",
        ]
    seen: list[Path] = []
    for place in places:
        if place.resolve() in (p.resolve() for p in seen):
            continue
        seen.append(place)
        if place.is_file():
            return place
        if place.is_dir() and (found := retail_file_in(place)) is not None:
            return found
    raise DataError(
        f"Online Retail data not found (looked in: {', '.join(str(p) for p in seen)}); download it from the "
        f"UCI Machine Learning Repository (dataset 352, {UCI_URL}) and pass --data-path or set HIERFED_DATA"
    )


def _numbers(values: pd.Series, *, path: Path, column: str) -> pd.Series:
    """A numeric column; DataError naming the first row that is not a number."""
    numbers = pd.to_numeric(values.str.strip(), errors="coerce")
    bad = numbers.isna().to_numpy()
    if bad.any():
        first = int(np.argmax(bad))
        value = values.iloc[first]
        what = f"empty {column}" if pd.isna(value) else f"{column} {quoted(value)} is not a number"
        raise DataError(f"{path}: {row_name(values.index[first])}: {what}; fix or drop the row")
    return numbers


def _customer_ids(values: pd.Series) -> pd.Series:
    """CustomerID as an integer string ('17850.0' -> '17850'); non-numeric ids are kept as written."""
    numbers = pd.to_numeric(values, errors="coerce")
    integral = (numbers.notna() & (numbers % 1 == 0)).to_numpy()
    ids = values.astype(str)
    ids[integral] = numbers[integral].astype("int64").astype(str)
    return ids


def _item_texts(codes: pd.Series, descriptions: pd.Series) -> pd.Series:
    """Per stock code, its most frequent description among the kept rows (ties: the first seen)."""
    rows = pd.DataFrame({"code": codes.to_numpy(), "text": descriptions.to_numpy(), "pos": np.arange(len(codes))})
    stats = (
        rows.dropna(subset=["text"])
        .groupby(["code", "text"], sort=False)["pos"]
        .agg(["size", "min"])
        .reset_index()
        .sort_values(["code", "size", "min"], ascending=[True, False, True])
        .drop_duplicates("code")
    )
    return pd.Series(stats["text"].to_numpy(), index=stats["code"].to_numpy())


def load_online_retail(path: Path) -> Dataset:
    """Customers' invoices as baskets, countries as sites, product descriptions as item texts."""
    path = Path(path)
    frame = _read(path)
    require_columns(frame, path, required=RETAIL_COLUMNS)
    skipped: dict[str, int] = {}

    def drop(mask: pd.Series | np.ndarray, reason: str) -> pd.DataFrame:
        # Filters apply in turn, so each row is counted under the first reason that drops it.
        keep = ~np.asarray(mask, dtype=bool)
        skipped[reason] = int((~keep).sum())
        return frame[keep]

    customer = frame["CustomerID"].str.strip()
    frame = drop(customer.isna() | (customer == ""), "guest_rows")
    quantity = _numbers(frame["Quantity"], path=path, column="Quantity")
    invoice = frame["InvoiceNo"].str.strip().str.upper()
    frame = drop(invoice.str.startswith("C").fillna(False) | (quantity <= 0), "cancelled_or_returned_rows")
    frame = drop(_numbers(frame["UnitPrice"], path=path, column="UnitPrice") <= 0, "nonpositive_price_rows")
    codes = frame["StockCode"].str.strip().str.upper()
    frame = drop(~codes.str.match(PRODUCT_CODE).fillna(False), "non_product_rows")

    codes = codes[frame.index]
    descriptions = frame["Description"].str.strip().replace("", np.nan)
    texts = _item_texts(codes, descriptions)
    frame = drop(~codes.isin(texts.index), "undescribed_product_rows")
    codes = codes[frame.index]

    items, item_ids = pd.factorize(codes)
    catalogue = Catalogue(item_ids=[str(c) for c in item_ids], texts=texts[item_ids].tolist())
    countries = frame["Country"].str.strip().fillna("Unspecified")
    invoices = frame["InvoiceNo"].str.strip()
    if invoices.isna().any():
        first = invoices.index[int(np.argmax(invoices.isna().to_numpy()))]
        raise DataError(f"{path}: {row_name(first)}: empty InvoiceNo; every purchase line needs its invoice")
    timestamps = parse_timestamps(frame["InvoiceDate"], path=path, column="InvoiceDate", formats=DATE_FORMATS)
    return dataset_from_events(
        name="online-retail",
        catalogue=catalogue,
        users=_customer_ids(frame["CustomerID"].str.strip()).tolist(),
        sites=countries.tolist(),
        baskets=invoices.tolist(),
        timestamps=timestamps.tolist(),
        items=items.tolist(),
        skipped=skipped,
    )
