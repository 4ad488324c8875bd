"""The `hierfed` command end to end on small synthetic data with the tiny backbone."""

from __future__ import annotations

import json

import pytest

from hiermodel.cli import main

SMALL = "data.synthetic-users=60 model.dim=8 model.max-tokens=8 model.max-history-items=12 model.max-baskets=4 train.batch-size=32"


@pytest.fixture(scope="module")
def trained(tiny_backbone: str, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--out", str(out), "--backbone", tiny_backbone, "--epochs", "2",
                 "--baselines", "gpop,ppop", "--run-config", SMALL])
    assert code == 0
    return str(out)


def test_train_writes_model_metrics_and_curves(trained: str) -> None:
    from pathlib import Path

    run = Path(trained)
    for name in ("model/config.json", "model/model.safetensors", "model/data.json", "metrics.json",
                 "run_config.json", "training_curves.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {"gpop", "ppop"}
    assert 0 <= metrics["test"]["ndcg@10"] <= 1 and len(metrics["history"]) >= 1
    assert json.loads((run / "model/data.json").read_text())["synthetic_users"] == 60


def test_evaluate_and_recommend(trained: str, capsys) -> None:
    assert main(["evaluate", "--model", trained, "--json", "--baselines", "gpop"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"hiermodel", "gpop"} and "explore_recall@20" in results["hiermodel"]
    assert main(["recommend", "--model", trained, "--user", "u0001", "-n", "5", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["recommendations"]) == 5
    first = rec["recommendations"][0]
    assert set(first["level_contributions"]) == {"word", "sentence", "paragraph"}
    assert first["score"] == pytest.approx(
        sum(first["level_contributions"].values()) + first["repeat_and_popularity"] + first["interaction"], abs=1e-3
    )
    assert rec["attention"]["words"] and rec["attention"]["items"]
    assert main(["recommend", "--model", trained, "--user", "u0001", "-n", "3"]) == 0
    assert "words weighted most" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["data", "--dataset", "/no/such/folder"], "no such name, file or folder"),
        (["train", "--out", "{tmp}/x", "--run-config", "model.nope=1"], "unknown run config key"),
        (["train", "--out", "{tmp}/x", "--run-config", "model.dim=abc"], "not a valid int"),
        (["evaluate", "--model", "{tmp}"], "no hierfed model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, tmp_path, capsys) -> None:
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err and len(err.splitlines()) == 1


def test_unknown_user_is_one_line(trained: str, capsys) -> None:
    assert main(["recommend", "--model", trained, "--user", "nobody"]) == 2
    assert "not in the data set" in capsys.readouterr().err


def test_data_summary(capsys) -> None:
    assert main(["data", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dataset"] == "synthetic" and summary["users"] == 600


def test_simulate_help_names_every_strategy_and_fault(capsys) -> None:
    from server.strategy import STRATEGIES
    from simulation.faults import KINDS

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help at spaces
    named = {word.strip(",;()") for word in text.split()}
    assert set(STRATEGIES) <= named
    fault_help = text.partition("KIND:")[2].partition("(repeatable)")[0]
    assert {word.strip(",") for word in fault_help.split()} == set(KINDS)
