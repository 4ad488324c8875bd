"""Generic behaviour data: an interactions table plus an items table (CSV or Parquet).

Also home of the table-reading helpers the other loaders share: every read failure, missing
column, empty value or bad timestamp becomes a one-line DataError naming file, row and column.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hiermodel.data.dataset import Catalogue, Dataset, build_users
from hiermodel.errors import DataError, quoted

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
INTERACTION_OPTIONAL = ("basket_id", "site")
ITEM_COLUMNS = ("item_id", "text")
TABLE_SUFFIXES = (".csv", ".parquet")
DEFAULT_SITE = "all"

_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def find_table(folder: Path, stem: str) -> Path | None:
    """``folder/stem.csv`` or ``folder/stem.parquet``, whichever exists (DataError if both do)."""
    found = [p for p in (folder / f"{stem}{suffix}" for suffix in TABLE_SUFFIXES) if p.is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep only one of them")
    return found[0] if found else None


def first_bad_utf8_line(path: Path) -> int | None:
    """The 1-based line of a (possibly compressed) text file that is not valid UTF-8, if any."""
    if path.suffix.lower() == ".zip":
        return None  # an archive's lines are not the file's bytes
    opener = _OPENERS.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return number
    except (OSError, EOFError, lzma.LZMAError):
        return None
    return None


def first_nul_line(path: Path, head: int = 1 << 16) -> int | None:
    """The 1-based line of the first NUL byte in a text file's first ``head`` bytes, if any.

    UTF-16 text (without BOM) and binary data decode as "UTF-8" full of NULs; no CSV or TSV holds one.
    """
    opener = _OPENERS.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as handle:
            data = handle.read(head)
    except (OSError, EOFError, lzma.LZMAError):
        return None
    at = data.find(b"\x00")
    return None if at < 0 else data[:at].count(b"\n") + 1


def not_utf8(path: Path, line: int | None = None) -> DataError:
    """The error for a file that is not UTF-8 text."""
    where = f"{path}: line {line}" if line else str(path)
    return DataError(f"{where}: not valid UTF-8 text; re-save the file with UTF-8 encoding")


def read_table(path: Path) -> pd.DataFrame:
    """A CSV (xz/gz/bz2/zip compressed ok, every cell a string) or Parquet table, with header names stripped."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path).reset_index(drop=True)  # positions name rows in errors
        else:
            if (line := first_nul_line(path)) is not None:
                raise not_utf8(path, line)
            with warnings.catch_warnings():
                # pandas warns, and drops data, when a row has more fields than the header
                warnings.simplefilter("error", pd.errors.ParserWarning)
                # Only empty cells are missing: an id such as 'NA' or 'None' stays a string.
                # index_col=False: extra fields never turn the first column into the index.
                frame = pd.read_csv(
                    path, dtype=str, encoding="utf-8-sig", keep_default_na=False, na_values=[""], index_col=False
                )
    except pd.errors.ParserWarning:
        raise DataError(
            f"{path}: a row has more fields than the header line; quote fields that hold a comma, or fix the header"
        ) from None
    except UnicodeDecodeError:
        raise not_utf8(path, first_bad_utf8_line(path)) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty; it needs a header line and data rows") from None
    except (OSError, ValueError, EOFError, lzma.LZMAError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{path}: cannot read the table ({detail}); check that it is a valid {path.suffix} file"
        ) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise DataError(f"{path}: the table has no data rows")
    return frame


def require_columns(
    frame: pd.DataFrame, path: Path, *, required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    """DataError listing the missing columns and the expected ones."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        expected = ", ".join(list(required) + [f"[{c}]" for c in optional])
        # Names as written when readable; quoted when they hold odd characters or are long.
        found = ", ".join(c if c.isprintable() and len(c) <= 60 else quoted(c) for c in map(str, frame.columns))
        found = found or "none"
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected columns {expected} (found: {found})"
        )


def row_name(index_value: object, unit: str = "row") -> str:
    """'row 3' / 'line 3': a frame's 0-based positional index label as a 1-based number."""
    return f"{unit} {int(index_value) + 1}"  # type: ignore[call-overload]


def id_strings(values: pd.Series, *, path: Path, column: str, unit: str = "row") -> pd.Series:
    """Ids as stripped strings (Parquet floats like 17850.0 -> '17850'); DataError on the first empty one."""
    numbers = values.dropna()
    # only floats that are exact integers (|x| < 2**53) become integer ids; others keep their float form
    if pd.api.types.is_float_dtype(values) and ((numbers % 1 == 0) & (numbers.abs() < 2**53)).all():
        values = values.astype("Int64")
    strings = values.astype("string").str.strip()
    empty = strings.isna() | (strings == "")
    if empty.any():
        first = empty.index[int(np.argmax(empty.to_numpy()))]
        raise DataError(f"{path}: {row_name(first, unit)}: empty {column}; every row needs a {column}")
    return strings.astype(str)


def _unix_seconds(times: pd.Series) -> pd.Series:
    """UTC datetimes as Unix seconds (NaN for NaT), whatever their resolution.

    Not ``times - Timestamp(0)``: that works in nanoseconds, which end in 2262.
    """
    micros = times.dt.tz_localize(None).to_numpy().astype("datetime64[us]").astype(np.int64)
    return pd.Series(np.where(times.isna().to_numpy(), np.nan, micros / 1e6), index=times.index)


def parse_timestamps(
    values: pd.Series,
    *,
    path: Path,
    column: str,
    formats: Sequence[str] = (),
    unit: str = "row",
) -> np.ndarray:
    """Unix seconds (float64) from datetimes, numbers (Unix seconds) or strings.

    Strings are tried against ``formats`` in turn; without formats, a numeric string is Unix
    seconds and any other is ISO 8601. Naive times are UTC. DataError names the first bad row.
    """
    if pd.api.types.is_datetime64_any_dtype(values):
        seconds = _unix_seconds(pd.to_datetime(values, utc=True))
    elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        seconds = values.astype("float64")
    else:
        strings = values.astype("string").str.strip()
        # float64, never a nullable Int64 (which could not take the parsed dates in below)
        numbers = pd.Series(np.nan, index=values.index) if formats else pd.to_numeric(strings, errors="coerce")
        seconds = numbers.astype("float64")
        for fmt in formats or ("ISO8601",):
            todo = seconds.isna()
            if not todo.any():
                break
            parsed = pd.to_datetime(strings[todo], format=fmt, utc=True, errors="coerce")
            seconds[todo] = _unix_seconds(parsed)
    bad = ~np.isfinite(seconds.to_numpy(dtype=np.float64))  # NaN, and 'inf' or 1e400 read as numbers
    if bad.any():
        first = int(np.argmax(bad))
        expected = (
            " or ".join(f"like {f!r}" for f in formats)
            if formats
            else "ISO 8601 (e.g. 2021-03-04T12:00:00) or Unix seconds"
        )
        raise DataError(
            f"{path}: {row_name(values.index[first], unit)}: cannot parse {column} "
            f"{quoted(str(values.iloc[first]))}; write it as {expected}"
        )
    return seconds.to_numpy(dtype=np.float64)


def session_keys(users: pd.Series, timestamps: np.ndarray, *, gap_seconds: float) -> np.ndarray:
    """Per event, a session number: a user's events split where the inactivity gap exceeds gap_seconds."""
    codes = pd.factorize(users)[0]
    order = np.lexsort((timestamps, codes))
    ts, cs = timestamps[order], codes[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (cs[1:] != cs[:-1]) | (np.diff(ts) > gap_seconds)
    keys = np.empty(len(order), dtype=np.int64)
    keys[order] = np.cumsum(starts)
    return keys


def dataset_from_events(
    *,
    name: str,
    catalogue: Catalogue,
    users: Iterable[str],
    sites: Iterable[str],
    baskets: Iterable[object],
    timestamps: Iterable[float],
    items: Iterable[int],
    skipped: dict[str, int] | None = None,
    shown: dict[object, np.ndarray] | None = None,
) -> Dataset:
    """A Dataset from parallel per-event columns (the shared last step of every loader).

    Events are taken in time order (ties: file order), so a basket lists its items as they came.
    """
    rows = list(zip(users, sites, baskets, timestamps, items))
    order = np.argsort(np.fromiter((r[3] for r in rows), dtype=np.float64, count=len(rows)), kind="stable")
    rows = [rows[i] for i in order]
    return Dataset(
        name=name,
        catalogue=catalogue,
        users=build_users(rows=rows, shown=shown),  # type: ignore[arg-type]
        skipped=dict(skipped or {}),
    )


def _load_items(path: Path) -> Catalogue:
    """The items table as a Catalogue; DataError on empty text or duplicate item ids."""
    frame = read_table(path)
    require_columns(frame, path, required=ITEM_COLUMNS)
    ids = id_strings(frame["item_id"], path=path, column="item_id")
    duplicated = ids.duplicated(keep=False)
    if duplicated.any():
        rows = ids.index[duplicated.to_numpy()]
        dup = ids[rows[0]]
        at = ", ".join(row_name(r) for r in rows[(ids[rows] == dup).to_numpy()][:5])
        raise DataError(f"{path}: duplicate item_id {quoted(dup)} ({at}); give each item one row")
    texts = frame["text"].astype("string").str.strip()
    empty = (texts.isna() | (texts == "")).to_numpy()
    if empty.any():
        first = int(np.argmax(empty))
        raise DataError(
            f"{path}: {row_name(frame.index[first])}: empty text for item_id {quoted(ids.iloc[first])}; "
            "give every item a text"
        )
    return Catalogue(item_ids=ids.tolist(), texts=texts.astype(str).tolist())


def load_interactions(folder: Path, *, session_gap_minutes: float = 30.0) -> Dataset:
    """Load ``interactions.csv|.parquet`` (user_id, item_id, timestamp[, basket_id][, site]) and ``items.*``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; it should hold interactions.csv (or .parquet) and items.csv")
    paths = {stem: find_table(folder, stem) for stem in ("interactions", "items")}
    for stem, path in paths.items():
        if path is None:
            raise DataError(f"{folder}: {stem}.csv (or {stem}.parquet) not found; add it next to the other table")
    items_path, path = paths["items"], paths["interactions"]
    assert items_path is not None and path is not None
    catalogue = _load_items(items_path)

    frame = read_table(path)
    require_columns(frame, path, required=INTERACTION_COLUMNS, optional=INTERACTION_OPTIONAL)
    users = id_strings(frame["user_id"], path=path, column="user_id")
    item_ids = id_strings(frame["item_id"], path=path, column="item_id")
    timestamps = parse_timestamps(frame["timestamp"], path=path, column="timestamp")

    items = pd.Index(catalogue.item_ids).get_indexer(item_ids)
    unknown = items < 0
    if unknown.any():
        first = int(np.argmax(unknown))
        distinct = item_ids[unknown].nunique()
        raise DataError(
            f"{path}: {row_name(frame.index[first])}: item_id {quoted(item_ids.iloc[first])} is not in "
            f"{items_path.name} ({int(unknown.sum())} rows, {distinct} unknown ids in all); "
            f"add them to {items_path.name} or drop those rows"
        )
    if "basket_id" in frame.columns:
        baskets: Iterable[object] = id_strings(frame["basket_id"], path=path, column="basket_id")
    else:
        baskets = session_keys(users, timestamps, gap_seconds=session_gap_minutes * 60.0).tolist()
    if "site" in frame.columns:
        sites: Iterable[str] = id_strings(frame["site"], path=path, column="site")
    else:
        sites = [DEFAULT_SITE] * len(frame)
    return dataset_from_events(
        name=folder.resolve().name or "interactions",
        catalogue=catalogue,
        users=users,
        sites=sites,
        baskets=baskets,
        timestamps=timestamps.tolist(),
        items=items.tolist(),
    )
