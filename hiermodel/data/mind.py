"""MIND news recommendation format: news.tsv + behaviors.tsv -> impressions as baskets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hiermodel.data.dataset import Catalogue, Dataset
from hiermodel.data.interactions import DEFAULT_SITE, dataset_from_events, not_utf8, parse_timestamps
from hiermodel.errors import DataError, quoted

NEWS_FIELDS = (
    "news_id", "category", "subcategory", "title", "abstract", "url", "title_entities", "abstract_entities",
)
BEHAVIOR_FIELDS = ("impression_id", "user_id", "time", "history", "impressions")
MIN_NEWS_FIELDS = 4  # news_id, category, subcategory, title; trailing empty fields may be cut off
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"  # '11/15/2019 8:55:22 AM'


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, tab-separated fields) of every non-blank line of a UTF-8 file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; a MIND folder holds news.tsv and behaviors.tsv")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, data[: exc.start].count(b"\n") + 1) from None
    if (nul := data.find(b"\x00")) >= 0:  # UTF-16 without BOM, or binary data: "valid UTF-8" full of NULs
        raise not_utf8(path, data[:nul].count(b"\n") + 1)
    # split("\n"), not splitlines(): titles may hold other Unicode line separators.
    lines = enumerate(text.split("\n"), start=1)
    rows = [(n, line.rstrip("\r").split("\t")) for n, line in lines if line.strip()]
    if not rows:
        raise DataError(f"{path}: file is empty; it needs one tab-separated row per line")
    return rows


def _malformed(path: Path, *, line: int, what: str) -> DataError:
    return DataError(f"{path}: line {line}: {what}; check the file is in the MIND format")


def _check_fields(path: Path, *, line: int, fields: list[str], names: Sequence[str], minimum: int) -> None:
    """DataError unless a row has between ``minimum`` and len(names) fields."""
    if not minimum <= len(fields) <= len(names):
        what = f"expected {len(names)} tab-separated fields ({', '.join(names)}), found {len(fields)}"
        raise _malformed(path, line=line, what=what)


def _load_news(path: Path) -> tuple[Catalogue, int]:
    """The news as a Catalogue (text 'title. abstract', labels category and subcategory), and duplicates skipped."""
    ids: list[str] = []
    texts: list[str] = []
    labels: dict[str, list[str]] = {"category": [], "subcategory": []}
    seen: set[str] = set()
    duplicates = 0
    for line, fields in _lines(path):
        _check_fields(path, line=line, fields=fields, names=NEWS_FIELDS, minimum=MIN_NEWS_FIELDS)
        news_id, category, subcategory, title = (f.strip() for f in fields[:4])
        abstract = fields[4].strip() if len(fields) > 4 else ""
        if not news_id:
            raise _malformed(path, line=line, what="empty news_id")
        if news_id in seen:
            duplicates += 1  # train and dev news.tsv overlap, so a merged file repeats rows
            continue
        text = ". ".join(part for part in (title, abstract) if part)
        if not text:
            raise _malformed(path, line=line, what=f"news {quoted(news_id)} has neither title nor abstract")
        seen.add(news_id)
        ids.append(news_id)
        texts.append(text)
        labels["category"].append(category)
        labels["subcategory"].append(subcategory)
    return Catalogue(item_ids=ids, texts=texts, labels=labels), duplicates


def _candidate(path: Path, *, line: int, token: str) -> tuple[str, bool]:
    """'N1234-1' -> ('N1234', True)."""
    news_id, _, label = token.rpartition("-")
    if not news_id or label not in ("0", "1"):
        raise _malformed(
            path,
            line=line,
            what=f"impression {quoted(token)} is not NEWSID-1 or NEWSID-0 "
            "(the MIND test split has no click labels; use train or dev)",
        )
    return news_id, label == "1"


def load_mind(folder: Path) -> Dataset:
    """Impressions as baskets (items = clicks, shown = candidates); a user's prior clicks as one earlier basket."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; it should hold MIND's news.tsv and behaviors.tsv")
    catalogue, duplicates = _load_news(folder / "news.tsv")
    index = catalogue.index()
    path = folder / "behaviors.tsv"
    rows = _lines(path)
    for line, fields in rows:
        _check_fields(path, line=line, fields=fields, names=BEHAVIOR_FIELDS, minimum=len(BEHAVIOR_FIELDS))
        if not fields[1].strip():
            raise _malformed(path, line=line, what="empty user_id")
    times = parse_timestamps(
        pd.Series([f[2] for _, f in rows], index=[n - 1 for n, _ in rows]),
        path=path, column="time", formats=(TIME_FORMAT,), unit="line",
    )

    events: dict[str, list] = {"users": [], "baskets": [], "timestamps": [], "items": []}
    shown: dict[object, np.ndarray] = {}
    first: dict[str, tuple[float, str]] = {}  # user -> (earliest impression time, its history)
    skipped = {"unknown_news_in_impressions": 0, "unknown_news_in_history": 0, "impressions_without_clicks": 0}

    def add(user: str, *, key: str, timestamp: float, items: list[int]) -> None:
        for column, value in (("users", user), ("baskets", key), ("timestamps", timestamp)):
            events[column].extend([value] * len(items))
        events["items"].extend(items)

    for (line, fields), timestamp in zip(rows, times.tolist()):
        user = fields[1].strip()
        if user not in first or timestamp < first[user][0]:
            first[user] = (timestamp, fields[3])
        candidates = [_candidate(path, line=line, token=token) for token in fields[4].split()]
        skipped["unknown_news_in_impressions"] += sum(n not in index for n, _ in candidates)
        clicked = [index[n] for n, click in candidates if click and n in index]
        if not clicked:
            skipped["impressions_without_clicks"] += 1
            continue
        key = f"line:{line}"  # impression ids need not be unique across merged files; lines are
        add(user, key=key, timestamp=timestamp, items=clicked)
        known = dict.fromkeys(index[n] for n, _ in candidates if n in index)
        shown[key] = np.fromiter(known, dtype=np.int64, count=len(known))
    for user, (timestamp, history) in first.items():
        # MIND's history holds clicks from before the log period: one basket just before the first impression.
        news = history.split()
        known = [index[n] for n in news if n in index]
        skipped["unknown_news_in_history"] += len(news) - len(known)
        add(user, key=f"history:{user}", timestamp=timestamp - 1.0, items=known)
    if duplicates:
        skipped["duplicate_news_rows"] = duplicates
    return dataset_from_events(
        name=folder.resolve().name or "mind",
        catalogue=catalogue,
        users=events["users"],
        sites=[DEFAULT_SITE] * len(events["users"]),
        baskets=events["baskets"],
        timestamps=events["timestamps"],
        items=events["items"],
        skipped=skipped,
        shown=shown,
    )
