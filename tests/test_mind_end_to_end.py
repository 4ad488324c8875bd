"""MIND-format data end to end: train with a topic head per level, evaluate with the MIND protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hiermodel.cli import main

TOPICS = {"sports": ["football", "tennis"], "food": ["recipes", "wine"], "news": ["politics", "world"]}


def write_mind_fixture(folder: Path, *, users: int = 30, seed: int = 0) -> Path:
    """news.tsv + behaviors.tsv in the MIND layout: users click news of their favourite topic."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    news, by_topic = [], {}
    for t, (topic, subs) in enumerate(TOPICS.items()):
        for k in range(8):
            nid = f"N{t}{k}"
            news.append(f"{nid}\t{topic}\t{subs[k % 2]}\t{topic} story {k} about {subs[k % 2]}\tAbstract {k}.\thttp://x\t[]\t[]")
            by_topic.setdefault(topic, []).append(nid)
    all_news = [n.split("\t")[0] for n in news]
    lines = []
    for u in range(users):
        favourite = list(TOPICS)[u % 3]
        history = " ".join(rng.choice(by_topic[favourite], size=2, replace=False))
        for i in range(4):
            clicked = rng.choice(by_topic[favourite])
            others = [n for n in rng.choice(all_news, size=4, replace=False) if n != clicked]
            shown = " ".join([f"{clicked}-1", *(f"{n}-0" for n in others)])
            lines.append(f"{len(lines) + 1}\tU{u}\t11/{10 + i}/2019 9:00:00 AM\t{history}\t{shown}")
    (folder / "news.tsv").write_text("\n".join(news) + "\n")
    (folder / "behaviors.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_mind_trains_with_topic_heads_and_reports_impression_metrics(tiny_backbone: str, tmp_path, capsys) -> None:
    data = write_mind_fixture(tmp_path / "mind")
    out = tmp_path / "run"
    code = main(["train", "--dataset", str(data), "--out", str(out), "--backbone", tiny_backbone, "--epochs", "2",
                 "--baselines", "gpop", "--run-config", "model.topic-label=category model.dim=8 model.max-tokens=8"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("impression_auc", "impression_mrr", "impression_ndcg@5", "impression_ndcg@10"):
        assert 0 <= metrics["test"][name] <= 1, name
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_topics"] == 3 and config["topic_label"] == "category"
    capsys.readouterr()  # the training log
    assert main(["evaluate", "--model", str(out), "--json", "--baselines", ""]) == 0
    assert "impression_auc" in json.loads(capsys.readouterr().out)["hiermodel"]
