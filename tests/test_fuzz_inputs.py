"""Bad input, fuzzed: every loader, the run config and the CLI get generated input (hypothesis).

Each case must end in a valid result (a Dataset / RunConfig with sane invariants) or in one
HierfedError whose message is one printable line; through the CLI, one error line on stderr and
exit code 2. Nothing here trains, starts Ray or loads a model: the CLI cases stop at a stub in
place of the heavy job, which checks that what reached it is valid.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hiermodel.data import Dataset, load_dataset, load_mind, load_online_retail, save_dataset
from hiermodel.data.dataset import Basket, Catalogue, User
from hiermodel.data.store import MANIFEST, read_manifest
from hiermodel.data_config import DataConfig
from hiermodel.errors import ConfigError, DataError, HierfedError

def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,  # the machine is shared: timing varies, outcomes do not
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
T0 = 1_700_000_000  # a Unix time
MAX_MESSAGE = 1500  # a long path plus a list of valid keys fits; a 100 kB field echoed back does not


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(root: Path) -> Path:
    """A new empty folder per generated case (hypothesis reuses the test's fixtures)."""
    return Path(tempfile.mkdtemp(dir=root))


def check_message(error: HierfedError) -> str:
    message = str(error)
    assert message.strip(), f"{type(error).__name__} without a message"
    assert message.isprintable(), f"not one printable line: {message[:300]!r}"
    assert len(message) <= MAX_MESSAGE, f"message of {len(message)} characters: {message[:300]!r}…"
    return message


def outcome(call, error: type[HierfedError] = DataError):
    """``call()``'s result, or None after checking that it raised one clear ``error``."""
    try:
        result = call()
    except error as exc:
        message = check_message(exc)
        # what kind of error, without the path and values (see --hypothesis-show-statistics)
        kind = message.split(": ", 1)[-1].split(": ")[-1]
        event("error: " + " ".join(w for w in kind.split()[:3] if w.isalpha()))
        return None
    event("valid")
    return result


def check_dataset(dataset: Dataset, *, max_events: int | None = None) -> None:
    """The invariants every loader promises about the internal form."""
    assert isinstance(dataset, Dataset)
    cat = dataset.catalogue
    assert len(cat.item_ids) == len(cat.texts) == len(set(cat.item_ids))
    assert all(isinstance(t, str) for t in cat.texts)
    seen_users = set()
    events = 0
    for user in dataset.users:
        assert user.user_id not in seen_users
        seen_users.add(user.user_id)
        assert isinstance(user.site, str) and isinstance(user.user_id, str)
        assert user.baskets, f"user {user.user_id!r} without baskets"
        times = [b.timestamp for b in user.baskets]
        assert all(math.isfinite(t) for t in times), f"non-finite timestamp in {times[:5]}"
        assert times == sorted(times)
        for basket in user.baskets:
            items = basket.items
            assert items.dtype == np.int64 and len(items) == len(set(items.tolist()))
            assert ((items >= 0) & (items < len(cat))).all()
            if basket.shown is not None:
                assert ((basket.shown >= 0) & (basket.shown < len(cat))).all()
            events += len(items)
    if max_events is not None:
        assert events <= max_events
    dataset.summary()  # what `hierfed data` prints


# --- strategies shared by the loaders ------------------------------------------------------------

HUGE = st.integers(20_000, 120_000).map(lambda n: "x" * n)
WEIRD_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
FIELD_NOISE = st.one_of(
    st.just(""), st.just(" "), st.sampled_from(["NA", "None", "nan", "null", '"', "a,b", "line\nbreak", "tab\there"]),
    WEIRD_TEXT, HUGE,
)
# How often a field is replaced by noise, per case: clean cases test the valid path's invariants.
NOISE_RATES = st.sampled_from([0.0, 0.0, 0.05, 0.3])
ENCODINGS = st.sampled_from(
    ["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16", "utf-16-le", "cp1252", "invalid-bytes", "raw"]
)


def chance(draw, rate: float) -> bool:
    return rate > 0 and draw(st.integers(0, 99)) < rate * 100


def noisy(draw, sane: st.SearchStrategy, rate: float):
    """A sane value, or (with probability ``rate``) noise."""
    return draw(FIELD_NOISE) if chance(draw, rate) else draw(sane)


@st.composite
def encoded(draw, text: str) -> bytes:
    """``text`` in UTF-8 or an odd encoding, with stray bytes, or replaced by random bytes."""
    encoding = draw(ENCODINGS)
    if encoding == "raw":
        return draw(st.binary(max_size=400))
    if encoding == "invalid-bytes":
        data = text.encode("utf-8")
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from([b"\xff", b"\x80\x81", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + data[at:]
    return text.encode(encoding, errors="replace")


GOOD_TIMES = st.one_of(
    st.integers(T0 - 10**7, T0 + 10**7).map(str),  # any order: rows are not sorted by time
    st.datetimes().map(lambda d: d.isoformat()),
    st.floats(0, 2e9).map(repr),
)
BAD_TIMES = st.one_of(
    st.sampled_from(["", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "2021-13-45", "yesterday", "0x10", "1,5"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


def timestamp(draw, rate: float) -> str:
    """Unix seconds in any order, ISO 8601, and (with probability ``rate``) what is neither."""
    return draw(st.one_of(BAD_TIMES, FIELD_NOISE)) if chance(draw, rate) else draw(GOOD_TIMES)


def write_csv(rows: list[list[str]], *, quoting: bool) -> str:
    if not quoting:  # no quoting: stray quotes, commas and newlines in fields break the table apart
        return "".join(",".join(r) + "\n" for r in rows)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


@st.composite
def columns(draw, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[str]:
    """The expected header, maybe with a column dropped, duplicated, renamed, padded or added."""
    names = list(required) + [c for c in optional if draw(st.booleans())]
    change = draw(st.sampled_from(["none"] * 6 + ["drop", "duplicate", "case", "pad", "extra"]))
    if change == "drop":
        names.pop(draw(st.integers(0, len(names) - 1)))
    elif change == "duplicate":
        names.append(draw(st.sampled_from(names)))
    elif change == "case":
        i = draw(st.integers(0, len(names) - 1))
        names[i] = names[i].upper()
    elif change == "pad":
        i = draw(st.integers(0, len(names) - 1))
        names[i] = f" {names[i]} "
    elif change == "extra":
        names.append(draw(st.one_of(WEIRD_TEXT, st.just(""))))
    return draw(st.permutations(names))


def file_bytes(draw, text: str, *, odd: bool) -> bytes:
    return draw(encoded(text)) if odd else text.encode("utf-8")


# --- generic interactions + items ------------------------------------------------------------------

ITEM_POOL = ["A", "B", "007", "NA", "ü-1", "x y"]


@st.composite
def generic_tables(draw):
    """items.csv and interactions.csv as rows of strings, most fields sane, some not."""
    rate = draw(NOISE_RATES)
    item_header = draw(columns(("item_id", "text")))
    ids = draw(st.lists(st.sampled_from(ITEM_POOL), min_size=1, max_size=6, unique=True))
    if chance(draw, rate / 3):
        ids.append(draw(st.sampled_from(ids)))  # a duplicate id
    items = []
    for item_id in ids:
        row = {"item_id": item_id, "text": noisy(draw, st.sampled_from(["red mug", "blue jug", "ünïcödé"]), rate)}
        items.append([row.get(c.strip().lower(), draw(WEIRD_TEXT)) for c in item_header])
    header = draw(columns(("user_id", "item_id", "timestamp"), ("basket_id", "site")))
    sane = {
        "user_id": st.sampled_from(["u1", "u2", "0042", "None"]),
        "item_id": st.sampled_from(ids + ["unknown"] if chance(draw, rate) else ids),
        "basket_id": st.sampled_from(["b1", "b2", "b3"]),
        "site": st.sampled_from(["north", "south", "unknown-site", "ünknown", "NA"]),  # any site name is a site
    }
    rows = []
    for _ in range(draw(st.integers(0, 8) if chance(draw, rate) else st.integers(1, 8))):  # 0: header only
        row = []
        for name in header:
            key = name.strip().lower()
            if key == "timestamp":
                row.append(timestamp(draw, rate))
            else:
                row.append(noisy(draw, sane.get(key, WEIRD_TEXT), rate))
        rows.append(row)
    return [item_header] + items, [header] + rows


@fuzz(150)
@given(tables=generic_tables(), quoting=st.booleans(), data=st.data())
def test_generic_csv(scratch: Path, tables, quoting: bool, data) -> None:
    items, events = tables
    folder = fresh(scratch)
    odd = data.draw(st.sampled_from(["none", "none", "items", "interactions"]))
    for name, rows in (("items", items), ("interactions", events)):
        (folder / f"{name}.csv").write_bytes(file_bytes(data.draw, write_csv(rows, quoting=quoting), odd=odd == name))
    gap = data.draw(st.sampled_from([30.0, 0.001, 1e9]))
    if data.draw(st.booleans()):
        dataset = outcome(lambda: load_dataset(str(folder), session_gap_minutes=gap))
    else:  # the run config's way in (data.dataset=PATH)
        dataset = outcome(lambda: DataConfig(dataset=str(folder), session_gap_minutes=gap).load())
    if dataset is not None:
        check_dataset(dataset, max_events=len(events) - 1)


@st.composite
def parquet_column(draw, kind: str, n: int) -> list:
    """A column of one dtype as Parquet keeps it: strings, ints, floats with NaN/inf, datetimes, bools."""
    sane = {"user": "str", "item": "int", "time": "datetime"}[kind]
    dtype = draw(st.sampled_from([sane] * 5 + ["str", "int", "float", "datetime", "bool", "none"]))
    if dtype == "str":
        base = {"user": ["u1", "u2"], "item": ["1", "2", "3"], "time": [str(T0), "2021-03-04T12:00:00", "1e400"]}[kind]
        values = st.sampled_from(base) if dtype == sane else st.one_of(st.sampled_from(base), FIELD_NOISE)
        return [draw(values) for _ in range(n)]
    if dtype == "int":
        return [draw(st.integers(1, 3)) if dtype == sane else draw(st.integers(-(2**63), 2**63 - 1)) for _ in range(n)]
    if dtype == "float":
        return [draw(st.one_of(st.integers(1, 3).map(float), st.floats(allow_nan=True, allow_infinity=True)))
                for _ in range(n)]
    if dtype == "datetime":
        return list(pd.to_datetime([draw(st.integers(0, 2 * 10**9)) for _ in range(n)], unit="s"))
    if dtype == "bool":
        return [draw(st.booleans()) for _ in range(n)]
    return [None] * n


@fuzz(50)
@given(n=st.integers(1, 6), data=st.data())
def test_generic_parquet(scratch: Path, n: int, data) -> None:
    folder = fresh(scratch)
    unique_ids = st.sampled_from([["1", "2", "3"], [1, 2, 3], [1.0, 2.0, 3.0]])
    item_ids = data.draw(st.one_of(unique_ids, unique_ids, unique_ids, parquet_column("item", 3)))
    texts = ["a mug", "a jug", data.draw(st.sampled_from(["a pot", "a pot", "a pot", "", " ", None, "x" * 50_000]))]
    pd.DataFrame({"item_id": item_ids, "text": texts}).to_parquet(folder / "items.parquet")
    frame = pd.DataFrame({
        "user_id": data.draw(parquet_column("user", n)),
        "item_id": data.draw(parquet_column("item", n)),
        "timestamp": data.draw(parquet_column("time", n)),
    })
    if data.draw(st.booleans()):
        frame["site"] = data.draw(parquet_column("user", n))
    frame = frame.drop(columns=data.draw(st.sampled_from([[], [], [], ["user_id"], ["timestamp"]])))
    frame.to_parquet(folder / "interactions.parquet")
    dataset = outcome(lambda: load_dataset(str(folder)))
    if dataset is not None:
        check_dataset(dataset, max_events=n)


# --- MIND ------------------------------------------------------------------------------------------

NEWS = ["N1", "N2", "N3", "N4"]
MIND_TIMES = st.one_of(
    st.datetimes(min_value=__import__("datetime").datetime(1000, 1, 1)).map(
        lambda d: d.strftime("%m/%d/%Y %I:%M:%S %p").lstrip("0")),
    st.just("11/15/2019 8:55:22 AM"),
)
MIND_BAD_TIMES = st.sampled_from(["13/45/2019 8:55:22 AM", "2019-11-15 08:55:22", "11/15/2019 25:00:00 PM", ""])


@st.composite
def mind_files(draw) -> tuple[str, str]:
    rate = draw(NOISE_RATES)
    news = []
    for news_id in draw(st.lists(st.sampled_from(NEWS), min_size=int(not chance(draw, rate)), max_size=6,
                                 unique=not chance(draw, rate))):
        fields = [noisy(draw, st.just(news_id), rate), "sports", "golf", noisy(draw, st.just("A title"), rate),
                  noisy(draw, st.just("An abstract"), rate), "https://x", "[]", "[]"]
        cut = draw(st.integers(1, 9)) if chance(draw, rate) else draw(st.sampled_from([4, 5, 8]))  # trailing fields may be cut
        news.append("\t".join(fields[:cut]))
    token = st.tuples(st.sampled_from(NEWS + ["N9"]), st.sampled_from(["0", "1"])).map("-".join)
    bad_token = st.one_of(st.sampled_from(["N1", "N1-2", "-1", "N1--1", "N1-1-1"]), WEIRD_TEXT)
    behaviors = []
    for i in range(draw(st.integers(0, 6) if chance(draw, rate) else st.integers(1, 6))):
        history = " ".join(draw(st.lists(st.sampled_from(NEWS + ["N9"]), max_size=4)))  # N9: unknown news
        impressions = " ".join(draw(bad_token) if chance(draw, rate) else draw(token)
                               for _ in range(draw(st.integers(0, 4))))
        time = draw(MIND_BAD_TIMES) if chance(draw, rate) else draw(MIND_TIMES)
        fields = [str(i), noisy(draw, st.sampled_from(["U1", "U2"]), rate), time, history, impressions]
        if chance(draw, rate):
            fields = fields[: draw(st.integers(0, 4))] + [draw(FIELD_NOISE)] * draw(st.integers(0, 2))
        behaviors.append("\t".join(fields))
    newline = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
    return newline.join(news), newline.join(behaviors)


@fuzz(100)
@given(files=mind_files(), data=st.data())
def test_mind(scratch: Path, files, data) -> None:
    folder = fresh(scratch)
    odd = data.draw(st.sampled_from(["none"] * 4 + ["news.tsv", "behaviors.tsv", "missing news", "missing behaviors"]))
    for name, text in zip(("news.tsv", "behaviors.tsv"), files):
        if odd != f"missing {name[:-4]}":
            (folder / name).write_bytes(file_bytes(data.draw, text, odd=odd == name))
    dataset = outcome(lambda: load_dataset(str(folder)) if data.draw(st.booleans()) else load_mind(folder))
    if dataset is not None:
        check_dataset(dataset)


# --- Online Retail ---------------------------------------------------------------------------------

RETAIL = ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country")
NUMBERS = st.sampled_from(["6", "1", "12", "2.55", "0", "-1"])  # <= 0: a return or a free item, dropped
BAD_NUMBERS = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e400", "abc", "", "1,5"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
RETAIL_VALUES = {
    "InvoiceNo": (st.sampled_from(["536365", "536366", "C536379", "c1", "A563185"]), st.just("")),
    "StockCode": (st.sampled_from(["85123A", "71053", "84406B", "POST", "M", "12345"]), st.just("")),
    "Description": (st.sampled_from(["WHITE HANGING HEART", "RED MUG", ""]), FIELD_NOISE),
    "Quantity": (NUMBERS, BAD_NUMBERS),
    "InvoiceDate": (st.sampled_from(["2010-12-01 08:26:00", "12/1/2010 8:26", "2011-01-05T10:00:00"]),
                    st.one_of(st.sampled_from(["2011-02-30 10:00:00", "13/13/2010 8:26", ""]), BAD_TIMES)),
    "UnitPrice": (NUMBERS, BAD_NUMBERS),
    "CustomerID": (st.sampled_from(["17850.0", "17850", "13047", "", "abc", "-1", "12.5"]),  # '': a guest, dropped
                   st.one_of(st.sampled_from(["1e20", "1e400", "inf", "nan"]), st.integers(-(2**70), 2**70).map(str))),
    "Country": (st.sampled_from(["United Kingdom", "France", "Unspecified", "Atlantis", ""]), FIELD_NOISE),
}


@fuzz(80)
@given(header=columns(RETAIL), quoting=st.booleans(), rate=NOISE_RATES, data=st.data())
def test_online_retail_csv(scratch: Path, header: list[str], quoting: bool, rate: float, data) -> None:
    rows = [header]
    for _ in range(data.draw(st.integers(0, 8) if chance(data.draw, rate) else st.integers(1, 8))):
        row = []
        for name in header:
            sane, bad = RETAIL_VALUES.get(name.strip(), (WEIRD_TEXT, FIELD_NOISE))
            row.append(data.draw(bad if chance(data.draw, rate) else sane))
        rows.append(row)
    text = write_csv(rows, quoting=quoting)
    path = fresh(scratch) / data.draw(st.sampled_from(["online_retail.csv"] * 5 + ["Online Retail.xlsx"]))
    path.write_bytes(file_bytes(data.draw, text, odd=data.draw(st.sampled_from([False, False, True]))))
    via = data.draw(st.sampled_from(["load_dataset", "loader"]))
    dataset = outcome(lambda: load_dataset(str(path)) if via == "load_dataset" else load_online_retail(path))
    if dataset is not None:
        check_dataset(dataset, max_events=len(rows) - 1)
        assert dataset.skipped.keys() >= {"guest_rows", "cancelled_or_returned_rows"}


# --- saved data sets (partitions) and the partition manifest ---------------------------------------


def small_dataset(num_users: int, num_items: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    catalogue = Catalogue([f"i{i}" for i in range(num_items)], [f"item {i}" for i in range(num_items)],
                          {"category": [f"c{i % 2}" for i in range(num_items)]})
    users = [
        User(f"u{u}", f"site-{u % 2}", [
            Basket(float(T0 + 10 * t), rng.choice(num_items, size=int(rng.integers(1, num_items + 1)), replace=False),
                   None if t % 2 else np.arange(num_items, dtype=np.int64))
            for t in range(int(rng.integers(1, 4)))
        ])
        for u in range(num_users)
    ]
    return Dataset("saved", catalogue, users, {"guest_rows": 3})


JSON_NOISE = st.one_of(
    st.sampled_from(["", "{", "[]", "null", "5", '"x"', '{"name": 5}', '{"skipped": [1]}', '{"skipped": {"a": "b"}}',
                     '{"name": null, "skipped": null}']),
    st.text(max_size=20),
)
BASKET_CHANGES = {
    "drop a column": lambda b, draw: b.drop(columns=[draw(st.sampled_from(list(b.columns)))]),
    "item out of range": lambda b, draw: b.assign(items=[np.array([draw(st.sampled_from([-1, 10**6]))])] * len(b)),
    "items as text": lambda b, draw: b.assign(items=["1,2"] * len(b)),
    "nan timestamp": lambda b, draw: b.assign(timestamp=draw(st.sampled_from([np.nan, np.inf]))),
    "timestamp as text": lambda b, draw: b.assign(timestamp="yesterday"),
    "empty basket": lambda b, draw: b.assign(items=[np.array([], dtype=np.int64)] * len(b)),
    "shown out of range": lambda b, draw: b.assign(shown=[np.array([10**6])] * len(b)),
    "no rows": lambda b, draw: b.iloc[:0],
    "out of order": lambda b, draw: b.assign(timestamp=b["timestamp"].to_numpy()[::-1]),
    "null user": lambda b, draw: b.assign(user_id=None),
}


@fuzz(60)
@given(num_users=st.integers(1, 4), num_items=st.integers(1, 4), seed=st.integers(0, 3), data=st.data())
def test_saved_dataset_folder(scratch: Path, num_users: int, num_items: int, seed: int, data) -> None:
    original = small_dataset(num_users, num_items, seed)
    folder = save_dataset(original, fresh(scratch) / "0")
    change = data.draw(st.sampled_from(["none", "none", "meta", "items file", "baskets file", *BASKET_CHANGES]))
    if change == "meta":
        (folder / "meta.json").write_text(data.draw(JSON_NOISE))
    elif change in ("items file", "baskets file"):
        name = "items.parquet" if change == "items file" else "baskets.parquet"
        what = data.draw(st.sampled_from(["missing", "bytes", "no columns"]))
        if what == "missing":
            (folder / name).unlink()
        elif what == "bytes":
            (folder / name).write_bytes(data.draw(st.binary(max_size=200)))
        else:
            pd.DataFrame({"other": [1]}).to_parquet(folder / name)
    elif change != "none":
        baskets = pd.read_parquet(folder / "baskets.parquet")
        BASKET_CHANGES[change](baskets, data.draw).to_parquet(folder / "baskets.parquet")
    dataset = outcome(lambda: load_dataset(str(folder)))
    if dataset is None:
        return
    check_dataset(dataset)
    if change == "none":  # saved and read back unchanged
        assert [u.user_id for u in dataset.users] == [u.user_id for u in original.users]
        assert dataset.catalogue == original.catalogue and dataset.skipped == original.skipped
        for got, want in zip(dataset.users, original.users):
            assert [b.items.tolist() for b in got.baskets] == [b.items.tolist() for b in want.baskets]


MANIFEST_ENTRY = st.fixed_dictionaries(
    {"partition": st.one_of(st.integers(0, 3), st.sampled_from(["0", None, -1, 1.5])),
     "site": st.one_of(st.sampled_from(["north", "other-sites"]), st.sampled_from([None, 3, ""])),
     "users": st.one_of(st.integers(0, 100), st.sampled_from([-1, "many", None])),
     "path": st.one_of(st.just("/tmp/p/0"), st.sampled_from([None, 0]))},
)


@fuzz(40)
@given(entries=st.one_of(st.lists(MANIFEST_ENTRY, max_size=4), JSON_NOISE), data=st.data())
def test_partition_manifest(scratch: Path, entries, data) -> None:
    folder = fresh(scratch)
    if data.draw(st.sampled_from([True] * 9 + [False])):
        text = entries if isinstance(entries, str) else json.dumps(entries)
        (folder / MANIFEST).write_bytes(file_bytes(data.draw, text, odd=data.draw(st.booleans())))
    manifest = outcome(lambda: read_manifest(folder))
    if manifest is not None:
        assert isinstance(manifest, list)
        for entry in manifest:
            assert isinstance(entry["partition"], int) and entry["partition"] >= 0
            assert isinstance(entry["site"], str) and entry["site"]
            assert isinstance(entry["users"], int) and entry["users"] >= 0
            assert isinstance(entry["path"], str)


# --- run config ------------------------------------------------------------------------------------

from hiermodel.run_config import RunConfig, parse_overrides  # noqa: E402

DEFAULTS = RunConfig.from_flat({}).to_flat()
# What a valid run config must satisfy, whichever way it was reached (checked on every success).
AT_LEAST_ONE = {
    "data.synthetic-users", "data.synthetic-sites", "model.max-tokens", "model.dim", "model.max-history-items",
    "model.max-baskets", "model.max-basket-items", "model.scorer-hidden", "model.backbone-dim", "train.epochs",
    "train.batch-size", "train.eval-batch-size", "fed.rounds", "fed.local-epochs", "fed.min-nodes",
}
POSITIVE = {"data.session-gap-minutes", "train.lr", "fed.round-timeout", "model.text-scale", "dp.max-grad-norm"}
CHOICES = {
    "model.combiner": ("learned", "fixed", "validation"),
    "train.targets": ("uniform", "latest", "all"),
    "train.negatives": ("catalogue", "sampled"),
    "dp.negatives": ("catalogue", "sampled"),
    "dp.accountant": ("prv", "rdp"),
}


def check_run_config(config: RunConfig) -> None:
    flat = config.to_flat()
    for key, value in flat.items():
        if isinstance(value, float):
            assert math.isfinite(value), f"{key}={value}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value >= 0 or key == "train.seed" or key == "data.synthetic-seed", f"{key}={value}"
    for key in AT_LEAST_ONE:
        assert flat[key] >= 1, f"{key}={flat[key]}"
    for key in POSITIVE:
        assert flat[key] > 0, f"{key}={flat[key]}"
    for key, valid in CHOICES.items():
        assert flat[key] in valid, f"{key}={flat[key]!r}"
    assert 0 < config.fed.fraction_train <= 1 and 0 <= config.fed.fraction_evaluate <= 1
    if config.model.fixed_lambda is not None:
        lam = config.model.fixed_lambda
        assert len(lam) == config.model.num_levels and min(lam) >= 0 and sum(lam) > 0
    assert RunConfig.from_flat(flat).to_flat() == flat  # what `flwr run` gets back reads the same


KEYS = st.one_of(
    st.sampled_from(sorted(DEFAULTS)),
    st.sampled_from(["model.nope", "bogus.key", "model", ".dim", "model..dim", "Model.dim", "model.dim.x", "fed.",
                     "model.extra", "=", "model.num_levels"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
)
VALUES = st.one_of(
    st.integers(-5, 5).map(str), st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "True", "yes", "", "none", "nan", "inf", "-inf", "1e400", "0.2,0.3,0.5", "0.5,0.5",
                     "1,,2", "learned", "fixed", "sampled", "prv", "fedavg", "validation", '"quoted"', "'q'", "9" * 5000,
                     "a b", "x=y"]),
    WEIRD_TEXT,
)


@st.composite
def override_text(draw) -> str:
    """A --run-config string: key=value pairs, quoted or not, sometimes not key=value at all."""
    parts = []
    for key, value in draw(st.lists(st.tuples(KEYS, VALUES), max_size=4)):
        how = draw(st.sampled_from(["quote", "quote", "raw", "no equals", "quote whole"]))
        if how == "quote":
            parts.append(f"{key}={shlex.quote(value)}")
        elif how == "raw":
            parts.append(f"{key}={value}")
        elif how == "no equals":
            parts.append(shlex.quote(key))
        else:
            parts.append(shlex.quote(f"{key}={value}"))
    return " ".join(parts)


@fuzz(200)
@given(text=st.one_of(override_text(), override_text(), st.text(max_size=40)))
def test_run_config_overrides(text: str) -> None:
    flat = outcome(lambda: parse_overrides(text), ConfigError)
    if flat is None:
        return
    assert all(isinstance(k, str) and k for k in flat)
    config = outcome(lambda: RunConfig.from_flat(flat), ConfigError)
    if config is not None:
        check_run_config(config)


# --- the CLI ---------------------------------------------------------------------------------------

from hiermodel.cli import build_parser, main  # noqa: E402


class ReachedHeavyWork(Exception):
    """Raised by the stubs that stand in for training, simulation and data preparation."""

    def __init__(self, command: str, **what) -> None:
        super().__init__(command)
        self.command, self.what = command, what


NUMBER_ARGS = st.one_of(st.sampled_from(["1", "2", "3", "0", "-1", "0.5", "nan", "inf", "-inf", "1e400", "x", ""]),
                        st.integers(-10, 10).map(str))


@st.composite
def cli_argv(draw, folders: dict[str, Path]) -> list[str]:
    """Random argv for data / train / simulate / evaluate / recommend, flags in any order and state."""
    command = draw(st.sampled_from(["data", "train", "simulate", "evaluate", "recommend"]))
    out = str(folders["out"])
    datasets = [str(folders["generic"]), str(folders["broken"]), str(folders["missing"]), str(folders["broken"] / "items.csv")]
    if command != "data":  # `data` really loads: never the 600 synthetic users or the real Online Retail file
        datasets += ["synthetic", "online-retail"]
    flags: list[tuple[str, st.SearchStrategy | None]] = [
        ("--dataset", st.sampled_from(datasets)), ("--data-path", st.sampled_from([str(folders["missing"]), ""])),
        ("--session-gap-minutes", NUMBER_ARGS),
    ]
    flags += {
        "data": [("--json", None)],
        "train": [("--out", st.just(out)), ("--backbone", st.sampled_from(["/nonexistent/model", "x"])),
                  ("--num-levels", NUMBER_ARGS), ("--combiner", st.sampled_from(["learned", "fixed", "bogus"])),
                  ("--epochs", NUMBER_ARGS), ("--seed", NUMBER_ARGS), ("--no-repeat", None),
                  ("--baselines", st.sampled_from(["gpop", "", "nope"])), ("--run-config", override_text())],
        "simulate": [("--out", st.just(out)), ("--num-clients", NUMBER_ARGS),
                     ("--partition", st.sampled_from(["natural", "iid", "dirichlet", "random"])),
                     ("--min-site-users", NUMBER_ARGS), ("--alpha", NUMBER_ARGS), ("--rounds", NUMBER_ARGS),
                     ("--strategy", st.sampled_from(["fedavg", "fedprox", "nope"])), ("--local-epochs", NUMBER_ARGS),
                     ("--personal-lambda", None), ("--target-epsilon", NUMBER_ARGS), ("--target-delta", NUMBER_ARGS),
                     ("--noise-multiplier", NUMBER_ARGS), ("--no-dp", None), ("--no-server-eval", None),
                     ("--cpus-per-site", NUMBER_ARGS), ("--prepare-only", None), ("--run-config", override_text())],
        "evaluate": [("--model", st.just(str(folders["missing"]))), ("--split", st.sampled_from(["test", "train"])),
                     ("--baselines", st.sampled_from(["gpop", "", "nope"])), ("--json", None)],
        "recommend": [("--model", st.just(str(folders["missing"]))), ("--user", st.sampled_from(["12347", ""])),
                      ("-n", NUMBER_ARGS), ("--json", None)],
    }[command]
    argv = [command]
    for flag, value in draw(st.lists(st.sampled_from(flags), max_size=8)):
        argv += [flag] if value is None else [flag, draw(value)]
    if command == "data" and "--dataset" not in argv:
        argv += ["--dataset", draw(st.sampled_from(datasets))]
    if command == "data" and "online-retail" in argv and "--data-path" not in argv:
        argv += ["--data-path", str(folders["missing"])]
    required = {"train": ["--out", out], "simulate": ["--out", out], "evaluate": ["--model", str(folders["missing"])],
                "recommend": ["--model", str(folders["missing"]), "--user", "u1"]}.get(command, [])
    if required and draw(st.sampled_from([True] * 5 + [False])):  # now and then a required flag is missing
        argv += required
    if draw(st.sampled_from([False] * 9 + [True])):
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--bogus", "-x", "", "--", "extra", "--json=1"])))
    return argv


@pytest.fixture(scope="module")
def cli_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    generic = root / "generic"
    generic.mkdir()
    (generic / "items.csv").write_text("item_id,text\nA,red mug\nB,blue jug\n", encoding="utf-8")
    (generic / "interactions.csv").write_text(f"user_id,item_id,timestamp\nu1,A,{T0}\nu1,B,{T0 + 9000}\n", encoding="utf-8")
    broken = root / "broken"
    broken.mkdir()
    (broken / "items.csv").write_text("item_id,text\nA,\n", encoding="utf-8")
    (broken / "interactions.csv").write_text("user_id,item_id\nu1,A\n", encoding="utf-8")
    return {"generic": generic, "broken": broken, "missing": root / "does-not-exist", "out": root / "run"}


def check_reached(argv: list[str], reached: ReachedHeavyWork) -> None:
    """What got past validation to the (stubbed) heavy work is a valid run."""
    from hiermodel.privacy import DPConfig
    from hiermodel.run_config import FedConfig

    what = reached.what
    if reached.command == "simulate":
        check_run_config(what["config"])
        # --num-clients / --min-site-users are checked by prepare_run's partitioning (stubbed here)
        assert math.isfinite(what["alpha"]) and what["alpha"] > 0
        assert build_parser().parse_args(argv).cpus_per_site > 0
    else:
        check_run_config(RunConfig(data=what["data"], model=what["model_config"], train=what["train_config"],
                                   fed=FedConfig(), dp=DPConfig(enabled=False)))  # central training: no DP


@fuzz(120)
@given(data=st.data())
def test_cli_argv(cli_folders, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, data) -> None:
    import hiermodel.jobs
    import simulation.cli

    def stub(command: str):
        def run(*args, **kwargs):
            raise ReachedHeavyWork(command, **({"config": args[0]} if args else {}), **kwargs)
        return run

    monkeypatch.setattr(hiermodel.jobs, "train_job", stub("train"))
    monkeypatch.setattr(simulation.cli, "prepare_run", stub("simulate"))
    monkeypatch.delenv("HIERFED_DATA", raising=False)
    argv = data.draw(cli_argv(cli_folders))
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage lines, then one "hierfed X: error: ..." line, exit 2
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.code == 2 and err, (argv, exc.code)
        assert sum(": error: " in line for line in err) == 1 and ": error: " in err[-1] and err[-1].isprintable()
        event("argparse usage error")
        return
    except ReachedHeavyWork as reached:
        check_reached(argv, reached)
        event(f"reached {reached.command}")
        return
    captured = capsys.readouterr()
    if code == 0:
        assert argv[0] == "data" and captured.out.strip() and not captured.err.strip()
        event("data summary")
        return
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (argv, code, lines[:5])
    assert lines[0].startswith(f"hierfed {argv[0]}: error: ")
    check_message(HierfedError(lines[0]))
    event(f"{argv[0]}: one error line")
