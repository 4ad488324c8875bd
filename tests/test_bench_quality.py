"""The quality suite of `hierfed bench` on tiny inputs (every row kind, every JSON field, the table and
the plot), its goal checks on made-up reports, and the gradient-boosted reranker baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hiermodel.baselines import BASELINE_NAMES, build_baseline
from hiermodel.data.dataset import Basket, Catalogue, Dataset, User
from hiermodel.data.split import Example
from hiermodel.errors import ConfigError
from hiermodel.evaluation import evaluate_ranker
from hiermodel.gbdt_reranker import FEATURES, GBDTReranker, candidate_features
from hiermodel.history import user_history
from hiermodel.cli import main
from simulation.bench_quality import METRICS, all_rows, check_targets, estimate_full_seconds, select_rows

from helpers import DAY, toy_dataset

TINY = ("data.synthetic-users=40 data.synthetic-sites=2 model.dim=8 model.max-tokens=8 model.max-history-items=8 "
        "model.max-baskets=4 model.scorer-hidden=8 train.batch-size=32")
ROW_FIELDS = {"name", "kind", "label", "epsilon", "n", "mean", "std", "seconds_per_run", "runs"}
RUN_FIELDS = {
    "baseline": {"seed", "metrics", "seconds"},
    "centralized": {"seed", "metrics", "seconds", "best_epoch", "epochs", "lambda"},
    "ablation": {"seed", "metrics", "seconds", "best_epoch", "epochs", "lambda"},
    "federated": {"seed", "metrics", "seconds", "rounds", "sites", "sites_replied", "noise_multiplier_range", "out"},
}
TARGET_FIELDS = {"name", "goal", "value", "threshold", "met", "limit", "applies"}


@pytest.fixture(scope="module")
def quality(tiny_backbone: str, tmp_path_factory):
    """Every row kind: the baselines, centralized and ablation rows over 2 seeds (so std is real), then a non-private
    and a DP federated run over 1 seed (each federated run starts Ray: the slow part)."""
    root = tmp_path_factory.mktemp("bench-quality")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_HOME", str(root / "flwr"))
        for name, seeds, rows in (("trained", "2", "baseline,centralized,ablation"), ("federated", "1", "fed-nodp,fed-dp8")):
            out = root / name
            code = main(["bench", "--quick", "--suite", "quality", "--backbone", tiny_backbone, "--out", str(out),
                         "--seeds", seeds, "--epochs", "1", "--rounds", "1", "--rows", rows, "--run-config", TINY])
            assert code == 0
            runs[name] = (out, json.loads((out / "bench.json").read_text())["quality"])
    return runs


def test_quality_json_has_every_field(quality) -> None:
    names = []
    for kind, (out, q) in quality.items():
        seeds = 2 if kind == "trained" else 1
        assert {"data", "settings", "metrics", "rows", "targets", "seconds", "estimate_full_seconds"} <= set(q)
        assert q["metrics"] == list(METRICS) and q["settings"]["seeds"] == list(range(seeds)) and q["settings"]["quick"]
        assert q["data"]["users"] == 40  # the size in --run-config wins over the quick default
        for row in q["rows"]:
            names.append(row["name"])
            assert ROW_FIELDS <= set(row), row["name"]
            assert row["n"] == (1 if row["kind"] == "baseline" else seeds) == len(row["runs"])
            for run in row["runs"]:
                assert RUN_FIELDS[row["kind"]] <= set(run), row["name"]
                assert set(run["metrics"]) == set(METRICS) and all(0 <= v <= 1 for v in run["metrics"].values())
                assert run["seconds"] > 0
            for m in METRICS:
                values = [run["metrics"][m] for run in row["runs"]]
                assert row["mean"][m] == pytest.approx(np.mean(values))
                assert row["std"][m] == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        for target in q["targets"]:
            assert TARGET_FIELDS <= set(target)
        assert q["estimate_full_seconds"] is None  # each half lacks a row kind: no basis for the full-run estimate
    assert sorted(names) == sorted([r.name for r in all_rows() if r.kind != "federated"] + ["fed-nodp", "fed-dp8"])

    out, q = quality["trained"]
    rows = {r["name"]: r for r in q["rows"]}
    assert rows["word-alone"]["runs"][0]["lambda"] == [1.0, 0.0, 0.0]
    assert rows["central"]["runs"][0]["metrics"] != rows["central"]["runs"][1]["metrics"]  # the seeds differ
    targets = {t["name"]: t for t in q["targets"]}
    assert not targets["centralized NDCG@10"]["applies"]  # synthetic data: the absolute goal is informative only
    assert targets["centralized NDCG@10"]["value"] == pytest.approx(rows["central"]["mean"]["ndcg@10"])
    assert targets["federated / centralized"]["met"] is None  # no federated row in this run

    out, q = quality["federated"]
    fed = {r["name"]: r for r in q["rows"]}
    assert fed["fed-dp8"]["epsilon"] == 8.0 and fed["fed-nodp"]["epsilon"] is None
    assert fed["fed-dp8"]["runs"][0]["noise_multiplier_range"][1] > 0
    assert fed["fed-nodp"]["runs"][0]["noise_multiplier_range"] is None
    for run in fed["fed-nodp"]["runs"] + fed["fed-dp8"]["runs"]:
        assert run["rounds"] == 1 and (out / "quality" / Path(run["out"]).name / "results.json").is_file()
    targets = {t["name"]: t for t in q["targets"]}
    assert targets["DP ε=1 / non-DP"]["met"] is None  # its row was not run
    ratio = fed["fed-dp8"]["mean"]["ndcg@10"] / fed["fed-nodp"]["mean"]["ndcg@10"]
    assert targets["DP ε=8 / non-DP"]["value"] == pytest.approx(ratio)


def test_quality_markdown_and_plot(quality) -> None:
    for kind, (out, _) in quality.items():
        text = (out / "bench.md").read_text()
        assert "### Quality on synthetic" in text and "**estimate** n/a" in text
        assert (out / "quality.png").is_file() and (out / "quality" / "quality.json").is_file()
    assert "| hierarchical model, centralized (3 levels, learned λ) |" in (quality["trained"][0] / "bench.md").read_text()
    text = (quality["federated"][0] / "bench.md").read_text()
    assert "| federated, DP ε = 8 |" in text and "| DP ε = 8 NDCG@10 ≥ 0.95 × federated non-DP |" in text


def _report(values: dict[str, float], name: str = "online-retail") -> dict:
    rows = []
    for row, ndcg in values.items():
        run = {"metrics": {m: ndcg for m in METRICS}, "best_epoch": 3, "seconds": 2.0}
        kind = "baseline" if row in ("ppop", "gbdt") else "federated" if row.startswith("fed") else "centralized"
        rows.append({"name": row, "kind": kind, "mean": run["metrics"], "std": {m: 0.0 for m in METRICS},
                     "runs": [run], "seconds_per_run": 2.0})
    return {"data": {"name": name}, "rows": rows,
            "settings": {"rounds": 10, "epochs": 20, "epsilons": [8.0, 4.0, 1.0], "train": {"batch_size": 64}}}


def test_goals_are_checked_against_the_means() -> None:
    targets = {t["name"]: t for t in check_targets(_report(
        {"ppop": 0.28, "central": 0.33, "fed-nodp": 0.31, "fed-dp8": 0.30, "fed-dp4": 0.2, "fed-dp1": 0.25}))}
    assert targets["centralized NDCG@10"]["met"] and targets["centralized NDCG@10"]["limit"] == ""
    assert not targets["federated / centralized"]["met"]  # 0.31 / 0.33 = 0.939 < 0.97
    assert targets["federated / centralized"]["value"] == pytest.approx(0.31 / 0.33)
    assert "10 federated rounds" in targets["federated / centralized"]["limit"]
    assert targets["DP ε=8 / non-DP"]["met"]  # 0.30 / 0.31 = 0.968
    assert not targets["DP ε=1 / non-DP"]["met"]  # 0.25 / 0.31 = 0.806 < 0.85
    assert targets["DP ε=4 / non-DP"]["met"] is None and targets["DP ε=4 / non-DP"]["value"] == pytest.approx(0.2 / 0.31)
    assert all(t["applies"] for t in targets.values())
    missing = {t["name"]: t for t in check_targets(_report({"central": 0.3}))}
    assert missing["federated / centralized"]["met"] is None and missing["centralized NDCG@10"]["met"] is False


def test_full_run_estimate_scales_measured_kinds() -> None:
    report = _report({"ppop": 0, "central": 0, "fed-nodp": 0})
    rows = all_rows()
    trained = sum(1 for r in rows if r.kind != "baseline")
    baselines = len(rows) - trained
    assert estimate_full_seconds(report) == pytest.approx(2.0 * (baselines + 3 * trained))
    assert estimate_full_seconds(_report({"central": 0})) is None  # no baseline or federated run measured


def test_row_selection() -> None:
    assert [r.name for r in select_rows("fed-dp8,baseline")] == ["gpop", "ppop", "itemknn", "zeroshot", "gbdt", "fed-dp8"]
    assert len(select_rows("")) == len(all_rows())
    with pytest.raises(ConfigError, match="unknown quality row 'nope'"):
        select_rows("nope")


def test_bad_quality_flags_are_one_line(tmp_path, capsys) -> None:
    assert main(["bench", "--suite", "quality", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--suite", "quality", "--rows", "central,bogus", "--out", str(tmp_path)]) == 2
    assert "unknown quality row 'bogus'" in capsys.readouterr().err


def test_resume_keeps_earlier_runs_and_runs_the_rest(tiny_backbone: str, tmp_path, capsys) -> None:
    """--resume reuses (row, seed) runs made with the same settings and keeps rows it does not run; other
    settings are one line and leave the table as it is; a run without --resume sets the old table aside."""
    out = tmp_path / "bench"
    table = out / "quality" / "quality.json"

    def bench(*flags: str) -> int:
        return main(["bench", "--quick", "--suite", "quality", "--backbone", tiny_backbone, "--out", str(out),
                     "--epochs", "1", "--run-config", TINY, *flags])

    assert bench("--rows", "ppop,central", "--seeds", "1") == 0
    first = json.loads(table.read_text())
    assert [r["name"] for r in first["rows"]] == ["ppop", "central"]
    assert bench("--rows", "gpop,central", "--seeds", "2", "--resume") == 0
    log = capsys.readouterr().out
    assert "central seed 0: kept from the earlier run" in log and "central seed 1: ndcg@10" in log
    second = json.loads(table.read_text())
    rows = {r["name"]: r for r in second["rows"]}
    assert list(rows) == ["gpop", "ppop", "central"]  # table order; ppop kept though not selected
    assert rows["ppop"] == first["rows"][0]
    assert [run["seed"] for run in rows["central"]["runs"]] == [0, 1] and rows["central"]["n"] == 2
    assert rows["central"]["runs"][0] == first["rows"][1]["runs"][0]  # the earlier run itself, not a rerun
    assert "quality" in json.loads((out / "bench.json").read_text())

    older = {**second, "config": {k: v for k, v in second["config"].items() if k != "dp.frozen"}}
    table.write_text(json.dumps(older))  # a table from before dp.frozen existed: the key at its default matches
    assert bench("--rows", "ppop", "--resume") == 0 and "4 runs kept" in capsys.readouterr().out
    table.write_text(json.dumps(older))
    assert bench("--rows", "ppop", "--resume", "--run-config", TINY + " dp.frozen=projections") == 2
    assert "was made with dp.frozen=" in capsys.readouterr().err
    table.write_text(json.dumps(second))
    assert bench("--rows", "gpop", "--resume", "--run-config", TINY + " train.lr=0.5") == 2
    assert "was made with train.lr=" in capsys.readouterr().err
    assert json.loads(table.read_text()) == second  # untouched
    table.write_text("{not json")
    assert bench("--rows", "gpop", "--resume") == 2
    assert "unreadable" in capsys.readouterr().err and table.read_text() == "{not json"
    table.write_text(json.dumps(second))
    assert bench("--rows", "gpop") == 0  # a fresh table; the earlier one is set aside whole
    aside = list((out / "quality").glob("quality-previous-*.json"))
    assert len(aside) == 1 and json.loads(aside[0].read_text()) == second
    assert [r["name"] for r in json.loads(table.read_text())["rows"]] == ["gpop"]
    assert main(["bench", "--suite", "speed", "--resume", "--out", str(out)]) == 2
    assert "--resume continues the quality suite" in capsys.readouterr().err


def test_resume_from_merges_tables_that_other_processes_made(tiny_backbone: str, tmp_path, capsys) -> None:
    """Rows run in two folders at once make one table with --resume-from: their runs are kept as they are,
    only what neither has is run; a table made with other settings, or no file, is one line and exit 2."""

    def bench(out, *flags: str) -> int:
        return main(["bench", "--quick", "--suite", "quality", "--backbone", tiny_backbone, "--out", str(out),
                     "--epochs", "1", "--run-config", TINY, *flags])

    def table(out) -> dict:
        return json.loads((out / "quality" / "quality.json").read_text())

    assert bench(tmp_path / "a", "--rows", "ppop,central") == 0
    assert bench(tmp_path / "b", "--rows", "gpop,central,no-repeat", "--seeds", "2") == 0  # central seed 0 in both
    a, b = table(tmp_path / "a"), table(tmp_path / "b")
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert bench(merged, "--rows", "gpop,ppop,central,no-repeat,levels-1", "--resume-from", str(tmp_path / "a" / "quality" / "quality.json"),
                 "--resume-from", str(tmp_path / "b" / "quality" / "quality.json")) == 0
    log = capsys.readouterr().out
    assert log.count("kept from the earlier run") == 4 and "levels-1 seed 0: ndcg@10" in log  # only the new row ran
    rows = {r["name"]: r for r in table(merged)["rows"]}
    assert list(rows) == ["gpop", "ppop", "central", "levels-1", "no-repeat"]  # table order
    a_central, b_central = (next(r for r in t["rows"] if r["name"] == "central")["runs"] for t in (a, b))
    assert rows["central"]["runs"] == [a_central[0], b_central[1]]  # seed 0: the first table's copy; seed 1: b's
    assert rows["no-repeat"]["runs"] == next(r for r in b["rows"] if r["name"] == "no-repeat")["runs"]
    assert table(merged)["settings"]["seeds"] == [0, 1]  # b's second seed is in the table, and the settings say so

    other = tmp_path / "other"
    assert main(["bench", "--quick", "--suite", "quality", "--backbone", tiny_backbone, "--out", str(other), "--epochs", "1",
                 "--run-config", TINY + " train.lr=0.5", "--rows", "gpop"]) == 0
    capsys.readouterr()
    before = table(merged)
    assert bench(merged, "--rows", "gpop", "--resume-from", str(other / "quality" / "quality.json")) == 2
    assert "was made with train.lr=" in capsys.readouterr().err and table(merged) == before
    assert bench(merged, "--rows", "gpop", "--resume-from", str(tmp_path / "nothing.json")) == 2
    err = capsys.readouterr().err
    assert "--resume-from" in err and "no such file" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert bench(merged, "--rows", "gpop", "--resume-from", str(broken)) == 2
    err = capsys.readouterr().err
    assert "--resume-from" in err and "unreadable" in err and table(merged) == before
    # a table that cannot be kept stops the bench before any other suite runs (their figures would be lost)
    assert main(["bench", "--quick", "--suite", "speed,quality", "--backbone", tiny_backbone, "--out", str(merged),
                 "--epochs", "1", "--run-config", TINY, "--resume-from", str(other / "quality" / "quality.json")]) == 2
    captured = capsys.readouterr()
    assert "was made with train.lr=" in captured.err and "speed:" not in captured.out
    assert main(["bench", "--suite", "speed", "--resume-from", str(tmp_path / "a" / "quality" / "quality.json"),
                 "--out", str(tmp_path / "s")]) == 2
    assert "--resume-from continues the quality suite" in capsys.readouterr().err


# --- the gradient-boosted reranker -----------------------------------------------------------------


def test_candidate_features_follow_the_history() -> None:
    baskets = [Basket(0.0, np.array([1, 2])), Basket(2 * DAY, np.array([2, 3])), Basket(5 * DAY, np.array([4]))]
    history = user_history(User("u", "s", baskets), 2)  # baskets 0 and 1, target at day 5
    popularity = np.log1p(np.arange(5, dtype=float))
    similarity = np.linspace(-1, 1, 5)
    f = candidate_features(history, np.array([0, 2, 3]), log_popularity=popularity, similarity=similarity)
    col = {name: f[:, i] for i, name in enumerate(FEATURES)}
    assert col["count"].tolist() == [0, 2, 1]
    assert col["decayed_count"] == pytest.approx([0, 1 + 0.9, 1])
    assert np.isnan(col["days_since_last_bought"][0]) and col["days_since_last_bought"][1:].tolist() == [3.0, 3.0]
    assert col["in_last_basket"].tolist() == [0, 1, 1]
    assert col["baskets_so_far"].tolist() == [2, 2, 2] and col["share_of_baskets"].tolist() == [0, 1, 0.5]
    assert col["log_popularity"] == pytest.approx(popularity[[0, 2, 3]])
    assert col["lm_similarity"] == pytest.approx(similarity[[0, 2, 3]])
    assert col["days_since_last_basket"].tolist() == [3.0, 3.0, 3.0]


def _loyal(num_users: int = 60, num_items: int = 40, seed: int = 0) -> Dataset:
    """Each user rebuys two 'own' items in every basket, plus random noise items: the repeat features tell."""
    rng = np.random.default_rng(seed)
    users = []
    for u in range(num_users):
        own = rng.choice(num_items, size=2, replace=False)
        baskets = [Basket(t * DAY, np.unique(np.concatenate([own, rng.choice(num_items, size=2)])).astype(np.int64))
                   for t in range(6)]
        users.append(User(f"u{u}", "s", baskets))
    return Dataset("loyal", Catalogue([f"i{i}" for i in range(num_items)], [f"item {i}" for i in range(num_items)]), users)


def test_gbdt_learns_the_repeat_signal_and_scores_the_whole_catalogue() -> None:
    data = _loyal()
    vectors = np.random.default_rng(1).normal(size=(data.num_items, 8))
    assert "gbdt" in BASELINE_NAMES
    ranker = build_baseline("gbdt", dataset=data, item_vectors=vectors)
    assert isinstance(ranker, GBDTReranker) and ranker.training_rows > 0
    scores = ranker.score(data, [Example(0, 5), Example(1, 5)])
    assert scores.shape == (2, data.num_items) and np.isfinite(scores).all()
    gbdt, gpop = evaluate_ranker(ranker, data), evaluate_ranker(build_baseline("gpop", dataset=data), data)
    # both own items are in every target (of 3-4 items): ranked in the top 10 they give recall ≥ 0.5
    assert gbdt["recall@10"] >= 0.5 > gpop["recall@10"]


def test_gbdt_needs_item_vectors_and_training_targets() -> None:
    data = toy_dataset(num_users=10, num_items=12)
    with pytest.raises(ValueError, match="needs item_vectors"):
        build_baseline("gbdt", dataset=data)
    with pytest.raises(ValueError, match="item vectors for a catalogue"):
        GBDTReranker(dataset=data, item_vectors=np.ones((3, 4)))
    single = Dataset("one", data.catalogue, [User("u", "s", [Basket(0.0, np.array([1]))])])
    with pytest.raises(ValueError, match="needs training targets"):
        GBDTReranker(dataset=single, item_vectors=np.ones((12, 4)))
