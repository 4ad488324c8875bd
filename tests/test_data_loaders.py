"""Loaders of the generic, MIND and Online Retail formats, their errors, and format detection."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hiermodel.data import (
    Dataset,
    find_online_retail,
    load_dataset,
    load_interactions,
    load_mind,
    load_online_retail,
)
from hiermodel.data import uci_retail as retail_module
from hiermodel.errors import DataError

T0 = 1_700_000_000  # a Unix time


def one_line_error(call, *parts: str) -> str:
    """Run ``call``, expect a one-line DataError containing every part; return its message."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def items_of(dataset: Dataset, basket) -> list[str]:
    return [dataset.catalogue.item_ids[i] for i in basket.items]


def user(dataset: Dataset, user_id: str):
    return next(u for u in dataset.users if u.user_id == user_id)


# --- generic interactions -------------------------------------------------------------------

ITEMS = pd.DataFrame({"item_id": ["007", "A", "B", "C"], "text": ["spy kit", " red mug ", "blue jug", "green pot"]})
EVENTS = pd.DataFrame(
    {
        "user_id": ["0042", "0042", "0042", "0042", "u2", "u2"],
        "item_id": ["A", "007", "B", "A", "C", "C"],
        "timestamp": [T0 + 100, T0, T0 + 5000, T0 + 9000, T0 + 50, T0 + 60],
        "basket_id": ["b2", "b1", "b2", "b3", "x", "x"],
        "site": ["north", "north", "south", "north", "south", "south"],
    }
)


def write_generic(folder: Path, events: pd.DataFrame, *, items: pd.DataFrame = ITEMS, fmt: str = "csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, frame in (("interactions", events), ("items", items)):
        if fmt == "csv":
            frame.to_csv(folder / f"{stem}.csv", index=False)
        else:
            frame.to_parquet(folder / f"{stem}.parquet", index=False)
    return folder


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_with_baskets_and_sites(tmp_path: Path, fmt: str) -> None:
    data = load_interactions(write_generic(tmp_path / "shop", EVENTS, fmt=fmt))
    assert data.catalogue.item_ids == ["007", "A", "B", "C"]
    assert data.catalogue.texts[1] == "red mug"
    first = user(data, "0042")  # ids stay strings: leading zeros kept
    assert first.site == "north"  # 3 of its 4 rows
    assert [items_of(data, b) for b in first.baskets] == [["007"], ["A", "B"], ["A"]]
    assert [b.timestamp for b in first.baskets] == [T0, T0 + 100, T0 + 9000]  # a basket's earliest event
    single = user(data, "u2")  # one basket: kept (trains, not evaluated)
    assert single.site == "south" and [items_of(data, b) for b in single.baskets] == [["C"]]
    assert data.name == "shop"


def test_generic_session_gap_and_default_site(tmp_path: Path) -> None:
    minutes = [0, 10, 45, 50, 200]  # gaps 10, 35, 5, 150 minutes
    events = pd.DataFrame(
        {"user_id": ["a"] * 5, "item_id": ["A", "B", "C", "A", "B"], "timestamp": [T0 + 60 * m for m in minutes]}
    )
    folder = write_generic(tmp_path / "g", events.sample(frac=1.0, random_state=1))  # row order does not matter
    by_30 = load_interactions(folder)
    assert [items_of(by_30, b) for b in by_30.users[0].baskets] == [["A", "B"], ["C", "A"], ["B"]]
    assert by_30.users[0].site == "all"
    by_60 = load_interactions(folder, session_gap_minutes=60)
    assert [items_of(by_60, b) for b in by_60.users[0].baskets] == [["A", "B", "C"], ["B"]]


def test_generic_iso_timestamps_match_unix(tmp_path: Path) -> None:
    iso = EVENTS.assign(
        timestamp=pd.to_datetime(EVENTS["timestamp"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    )
    iso.loc[0, "timestamp"] = pd.Timestamp(T0 + 100, unit="s").strftime("%Y-%m-%dT%H:%M:%S")  # naive = UTC
    iso.loc[1, "timestamp"] = (pd.Timestamp(T0, unit="s", tz="UTC").tz_convert("Europe/Paris")).isoformat()
    from_iso = load_interactions(write_generic(tmp_path / "iso", iso))
    from_unix = load_interactions(write_generic(tmp_path / "unix", EVENTS))
    assert [[b.timestamp for b in u.baskets] for u in from_iso.users] == [
        [b.timestamp for b in u.baskets] for u in from_unix.users
    ]


def test_generic_parquet_datetime_and_numeric_ids(tmp_path: Path) -> None:
    events = pd.DataFrame(
        {"user_id": [17850.0, 17850.0], "item_id": ["A", "B"], "timestamp": pd.to_datetime([T0, T0 + 7200], unit="s")}
    )
    data = load_interactions(write_generic(tmp_path / "p", events, fmt="parquet"))
    assert data.users[0].user_id == "17850"
    assert [b.timestamp for b in data.users[0].baskets] == [T0, T0 + 7200]


# --- generic: bad input -----------------------------------------------------------------------


def test_generic_missing_columns(tmp_path: Path) -> None:
    folder = write_generic(tmp_path, EVENTS.drop(columns=["timestamp", "item_id"]))
    one_line_error(lambda: load_interactions(folder), "interactions.csv", "item_id, timestamp", "expected columns")
    write(tmp_path / "items.csv", "item_id,title\nA,x\n")
    one_line_error(lambda: load_interactions(tmp_path), "items.csv", "missing column(s) text")


def test_generic_bad_timestamp_names_row(tmp_path: Path) -> None:
    events = EVENTS.astype({"timestamp": str})
    events.loc[2, "timestamp"] = "yesterday"
    folder = write_generic(tmp_path, events)
    one_line_error(
        lambda: load_interactions(folder), "interactions.csv", "row 3", "timestamp", "'yesterday'", "ISO 8601"
    )


def test_generic_empty_and_header_only_files(tmp_path: Path) -> None:
    write_generic(tmp_path, EVENTS)
    write(tmp_path / "interactions.csv", "")
    one_line_error(lambda: load_interactions(tmp_path), "interactions.csv", "empty")
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\n")
    one_line_error(lambda: load_interactions(tmp_path), "interactions.csv", "no data rows")


def test_generic_unknown_item_ids(tmp_path: Path) -> None:
    events = EVENTS.copy()
    events.loc[[3, 5], "item_id"] = ["Z9", "Z8"]
    folder = write_generic(tmp_path, events)
    one_line_error(lambda: load_interactions(folder), "interactions.csv", "row 4", "'Z9'", "items.csv", "2 rows")


def test_generic_duplicate_item_and_empty_text(tmp_path: Path) -> None:
    duplicated = pd.concat([ITEMS, ITEMS.iloc[[2]]], ignore_index=True)
    folder = write_generic(tmp_path / "dup", EVENTS, items=duplicated)
    one_line_error(lambda: load_interactions(folder), "items.csv", "duplicate item_id 'B'", "row 3", "row 5")
    folder = write_generic(tmp_path / "empty", EVENTS, items=ITEMS.assign(text=["a", "b", "  ", "d"]))
    one_line_error(lambda: load_interactions(folder), "items.csv", "row 3", "empty text", "'B'")


def test_generic_empty_id_names_row(tmp_path: Path) -> None:
    write_generic(tmp_path, EVENTS)
    write(tmp_path / "interactions.csv", f"user_id,item_id,timestamp\nu,A,{T0}\n,B,{T0}\n")
    one_line_error(lambda: load_interactions(tmp_path), "interactions.csv", "row 2", "empty user_id")


def test_generic_non_utf8_file(tmp_path: Path) -> None:
    write_generic(tmp_path, EVENTS)
    (tmp_path / "items.csv").write_bytes("item_id,text\nA,ok\nB,caf\u00e9\n".encode("latin-1"))
    one_line_error(lambda: load_interactions(tmp_path), "items.csv", "line 3", "UTF-8")


def test_generic_missing_folder_and_files(tmp_path: Path) -> None:
    one_line_error(lambda: load_interactions(tmp_path / "nope"), "nope", "not found")
    write_generic(tmp_path, EVENTS)
    (tmp_path / "items.csv").unlink()
    one_line_error(lambda: load_interactions(tmp_path), "items.csv", "not found")
    write_generic(tmp_path, EVENTS, fmt="parquet")
    one_line_error(lambda: load_interactions(tmp_path), "interactions.csv", "interactions.parquet", "keep only one")


def test_generic_unreadable_parquet(tmp_path: Path) -> None:
    write_generic(tmp_path, EVENTS, fmt="parquet")
    (tmp_path / "interactions.parquet").write_bytes(b"not a parquet file")
    one_line_error(lambda: load_interactions(tmp_path), "interactions.parquet", "cannot read the table")


# --- MIND -----------------------------------------------------------------------------------

NEWS = (
    "N1\tsports\tfootball\tCup final tonight\tThe final is here.\thttp://x/1\t[]\t[]\n"
    "N2\tnews\tpolitics\tVote counted\t\thttp://x/2\t[]\t[]\n"
    "N3\tsports\ttennis\tOpen begins\tSeeds advance.\thttp://x/3\t[]\t[]\n"
    "N4\tfood\trecipes\tSoup\tWarm soup.\thttp://x/4\t[]\t[]\n"
)
BEHAVIORS = (
    "1\tU1\t11/15/2019 8:55:22 AM\tN2 N3\tN1-1 N4-0 N9-0\n"
    "2\tU2\t11/15/2019 9:00:00 AM\t\tN3-1 N2-1 N1-0\n"
    "3\tU1\t11/14/2019 1:00:00 PM\tN3 N8\tN4-1 N2-0\n"
    "4\tU1\t11/16/2019 10:00:00 PM\tN2 N3\tN9-1 N1-0\n"
)


def write_mind(folder: Path, *, news: str = NEWS, behaviors: str = BEHAVIORS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "news.tsv", news)
    write(folder / "behaviors.tsv", behaviors)
    return folder


def test_mind_loader(tmp_path: Path) -> None:
    data = load_mind(write_mind(tmp_path / "mind"))
    cat = data.catalogue
    assert cat.item_ids == ["N1", "N2", "N3", "N4"]
    assert cat.texts[:2] == ["Cup final tonight. The final is here.", "Vote counted"]
    assert cat.labels == {
        "category": ["sports", "news", "sports", "food"],
        "subcategory": ["football", "politics", "tennis", "recipes"],
    }
    u1 = user(data, "U1")
    first = pd.Timestamp("2019-11-14 13:00:00", tz="UTC").timestamp()
    # History of the earliest impression (line 3) one second before it, then the impressions in time order;
    # line 4 clicked only an unknown news item, so it is no basket.
    later = pd.Timestamp("2019-11-15 08:55:22", tz="UTC").timestamp()
    assert [b.timestamp for b in u1.baskets] == [first - 1, first, later]
    assert [items_of(data, b) for b in u1.baskets] == [["N3"], ["N4"], ["N1"]]
    assert u1.baskets[0].shown is None
    assert [cat.item_ids[i] for i in u1.baskets[1].shown] == ["N4", "N2"]
    assert [cat.item_ids[i] for i in u1.baskets[2].shown] == ["N1", "N4"]
    u2 = user(data, "U2")  # empty history: no extra basket
    assert [items_of(data, b) for b in u2.baskets] == [["N3", "N2"]]
    assert {u.site for u in data.users} == {"all"}
    assert data.skipped == {
        "unknown_news_in_impressions": 2, "unknown_news_in_history": 1, "impressions_without_clicks": 1,
    }


def test_mind_malformed_rows(tmp_path: Path) -> None:
    bad = BEHAVIORS.replace("2\tU2\t", "2\tU2\t\t")
    folder = write_mind(tmp_path / "a", behaviors=bad)
    one_line_error(lambda: load_mind(folder), "behaviors.tsv", "line 2", "expected 5 tab-separated fields")
    folder = write_mind(tmp_path / "b", behaviors=BEHAVIORS.replace("11/15/2019 9:00:00 AM", "15.11.2019"))
    one_line_error(lambda: load_mind(folder), "behaviors.tsv", "line 2", "time", "'15.11.2019'")
    folder = write_mind(tmp_path / "c", behaviors=BEHAVIORS.replace("N4-1", "N4"))
    one_line_error(lambda: load_mind(folder), "behaviors.tsv", "line 3", "'N4'", "test split")
    folder = write_mind(tmp_path / "d", news=NEWS + "N5\tfood\n")
    one_line_error(lambda: load_mind(folder), "news.tsv", "line 5", "found 2")
    folder = write_mind(tmp_path / "e")
    (folder / "behaviors.tsv").unlink()
    one_line_error(lambda: load_mind(folder), "behaviors.tsv", "not found")


def test_mind_encoding_and_empty_files(tmp_path: Path) -> None:
    folder = write_mind(tmp_path / "latin")
    (folder / "news.tsv").write_bytes(NEWS.replace("Soup", "Soupe gratin\u00e9e").encode("latin-1"))
    one_line_error(lambda: load_mind(folder), "news.tsv", "line 4", "UTF-8")
    folder = write_mind(tmp_path / "empty", behaviors="\n")
    one_line_error(lambda: load_mind(folder), "behaviors.tsv", "empty")


# --- Online Retail --------------------------------------------------------------------------

RETAIL_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
RETAIL_ROWS = (
    "536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
    "536365,71053,WHITE METAL LANTERN,6,2010-12-01 08:26:00,3.39,17850.0,United Kingdom\n"
    "536366,85123a,WHITE HANGING HEART T-LIGHT HOLDER,2,2010-12-02 09:00:00,2.55,17850.0,United Kingdom\n"
    "536366,71053, WHITE LANTERN ,1,2010-12-02 09:00:00,3.39,17850.0,United Kingdom\n"
    "536367,71053,WHITE METAL LANTERN,1,2010-12-03 10:00:00,3.39,,United Kingdom\n"
    "C536368,71053,WHITE METAL LANTERN,-1,2010-12-03 11:00:00,3.39,17850.0,United Kingdom\n"
    "536369,85123A,WHITE HANGING HEART T-LIGHT HOLDER,-2,2010-12-03 12:00:00,2.55,17850.0,United Kingdom\n"
    "536370,22000,FREE GIFT,1,2010-12-04 08:00:00,0.0,12583.0,France\n"
    "536370,POST,POSTAGE,1,2010-12-04 08:00:00,18.0,12583.0,France\n"
    "536370,22222,PINK MUG,1,2010-12-04 08:00:00,1.25,12583.0,France\n"
    "536371,22222,ROSE MUG,2,2010-12-05 08:00:00,1.25,12583.0,France\n"
    "536372,M,Manual,1,2010-12-06 08:00:00,5.0,12583.0,Germany\n"
    "536372,71053,WHITE METAL LANTERN,1,2010-12-06 08:00:00,3.39,12583.0,Germany\n"
)


def test_online_retail_cleaning(tmp_path: Path) -> None:
    data = load_online_retail(write(tmp_path / "retail.csv", RETAIL_HEADER + RETAIL_ROWS))
    assert data.catalogue.item_ids == ["85123A", "71053", "22222"]  # 85123a folded into 85123A
    # 71053: 'WHITE METAL LANTERN' 3 kept rows vs 'WHITE LANTERN' 1; 22222: a tie -> the first seen.
    assert data.catalogue.texts == ["WHITE HANGING HEART T-LIGHT HOLDER", "WHITE METAL LANTERN", "PINK MUG"]
    assert data.skipped == {
        "guest_rows": 1,
        "cancelled_or_returned_rows": 2,
        "nonpositive_price_rows": 1,
        "non_product_rows": 2,
        "undescribed_product_rows": 0,
    }
    uk = user(data, "17850")
    assert uk.site == "United Kingdom"
    assert [items_of(data, b) for b in uk.baskets] == [["85123A", "71053"], ["85123A", "71053"]]
    assert uk.baskets[0].timestamp == pd.Timestamp("2010-12-01 08:26:00", tz="UTC").timestamp()
    fr = user(data, "12583")
    assert fr.site == "France"  # 2 kept rows in France, 1 in Germany
    assert [items_of(data, b) for b in fr.baskets] == [["22222"], ["22222"], ["71053"]]


def test_online_retail_bad_input(tmp_path: Path) -> None:
    no_country = RETAIL_HEADER.replace(",Country", "") + "536365,10000,X,1,2010-12-01 08:26:00,1.0,1.0\n"
    path = write(tmp_path / "r.csv", no_country)
    one_line_error(lambda: load_online_retail(path), "r.csv", "missing column(s) Country")
    path = write(tmp_path / "q.csv", RETAIL_HEADER + RETAIL_ROWS.replace(",2,2010-12-02", ",two,2010-12-02"))
    one_line_error(lambda: load_online_retail(path), "q.csv", "row 3", "Quantity", "'two'")
    path = write(tmp_path / "d.csv", RETAIL_HEADER + RETAIL_ROWS.replace("2010-12-05 08:00:00", "soon"))
    one_line_error(lambda: load_online_retail(path), "d.csv", "row 11", "InvoiceDate", "'soon'")


@pytest.mark.skipif(retail_module._has_openpyxl(), reason="openpyxl is installed")
def test_online_retail_xlsx_needs_openpyxl(tmp_path: Path) -> None:
    path = tmp_path / "Online Retail.xlsx"
    path.write_bytes(b"PK\x03\x04")
    one_line_error(lambda: load_online_retail(path), "Online Retail.xlsx", "openpyxl")


def test_find_online_retail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    table = write(folder / "export.csv", RETAIL_HEADER + RETAIL_ROWS)  # told by header, not name
    write(folder / "other.csv", "a,b\n1,2\n")
    assert find_online_retail(str(folder)) == table
    assert find_online_retail(str(table)) == table
    monkeypatch.setenv("HIERFED_DATA", str(folder))
    assert find_online_retail(None) == table

    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(lambda: find_online_retail(str(empty)), str(empty), "UCI Machine Learning Repository", "352",
                   "https://archive.ics.uci.edu/dataset/352/online+retail", "--data-path", "HIERFED_DATA")
    # Nothing anywhere: env unset, no ../shared next to the cwd or the (pretended) repository.
    monkeypatch.delenv("HIERFED_DATA")
    monkeypatch.chdir(empty)
    monkeypatch.setattr(retail_module, "__file__", str(tmp_path / "repo" / "hiermodel" / "data" / "x.py"))
    message = one_line_error(lambda: find_online_retail(None), "not found", "HIERFED_DATA")
    assert str(tmp_path / "shared" / "data" / "online-retail") in message


# --- format detection -----------------------------------------------------------------------


def test_load_dataset_tells_formats_apart(tmp_path: Path) -> None:
    generic = load_dataset(str(write_generic(tmp_path / "generic", EVENTS, fmt="parquet")))
    assert generic.catalogue.item_ids == ["007", "A", "B", "C"]
    mind = load_dataset(str(write_mind(tmp_path / "mind")))
    assert sorted(mind.catalogue.labels) == ["category", "subcategory"]
    retail_file = write(tmp_path / "purchases.dat", RETAIL_HEADER + RETAIL_ROWS)
    assert load_dataset(str(retail_file)).name == "online-retail"
    (tmp_path / "retail").mkdir()
    retail_file.rename(tmp_path / "retail" / "purchases.csv")
    assert load_dataset(str(tmp_path / "retail")).name == "online-retail"
    assert load_dataset("online-retail", data_path=str(tmp_path / "retail")).num_items == 3
    gap = load_dataset(str(tmp_path / "generic"), session_gap_minutes=1.0)
    assert gap.num_items == 4


def test_load_dataset_rejects_unknown(tmp_path: Path) -> None:
    accepted = ("'synthetic'", "'online-retail'", "interactions.csv", "news.tsv")
    one_line_error(lambda: load_dataset("nonsense"), "'nonsense'", *accepted)
    one_line_error(lambda: load_dataset(str(tmp_path)), str(tmp_path), "no data set found", *accepted)
    other = write(tmp_path / "other.csv", "user_id,item_id,timestamp\nu,A,1\n")
    one_line_error(lambda: load_dataset(str(other)), "other.csv", "not an Online Retail table", "pass its folder")


# --- the real file ----------------------------------------------------------------------------


@pytest.mark.integration
def test_real_online_retail_counts() -> None:
    try:
        path = find_online_retail(None)
    except DataError as exc:
        pytest.skip(f"Online Retail not found: {exc}")
    start = time.perf_counter()
    data = load_online_retail(path)
    seconds = time.perf_counter() - start
    summary = data.summary()
    assert (summary["items"], summary["users"], summary["users_with_3plus_baskets"], summary["sites"]) == (
        3659, 4334, 1998, 37,
    )
    assert all(u.baskets == sorted(u.baskets, key=lambda b: b.timestamp) for u in data.users[:100])
    assert all(np.unique(b.items).size == b.items.size for u in data.users for b in u.baskets)
    assert seconds < 15.0
