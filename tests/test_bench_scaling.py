"""The scaling suite of `hierfed bench` on tiny inputs: two real simulations (1 round each) produce
well-formed JSON with every field, the Markdown table and the plot; the growth maths on its own."""

from __future__ import annotations

import json
import math

import pytest

from hiermodel.data.synthetic import SyntheticConfig
from hiermodel.data_config import DataConfig
from hiermodel.errors import ConfigError
from hiermodel.model import HierModelConfig
from simulation.bench import BenchSettings, run_bench
from simulation.bench_scaling import COMPONENTS, ScalingPoint, ScalingSettings, growth, scaling_settings

POINT_FIELDS = {"name", "data", "sites", "history", "users", "items", "baskets", "mean_history_items",
                "mean_history_baskets", "max_history_items", "max_baskets", "dp", "rounds", "concurrency", "round_seconds",
                "round_seconds_from", "first_round_seconds", "split", "per_round", "encoding_seconds", "prepare_seconds",
                "ray_startup_shutdown_seconds", "server_setup_seconds", "wall_seconds", "memory"}
MEMORY_FIELDS = {"driver_start_rss_mib", "driver_peak_rss_mib", "driver_added_mib", "workers", "worker_peak_rss_mib",
                 "workers_sum_peak_rss_mib", "samples", "load_average"}


@pytest.fixture(scope="module")
def report(tiny_backbone: str, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_HOME", str(out / "flwr"))
        mp.setenv("HIERFED_CACHE", str(out / "cache"))
        scaling = ScalingSettings(
            points=(ScalingPoint("s2", "synthetic", 2), ScalingPoint("s2-h4", "synthetic", 2, 4), ScalingPoint("s3", "synthetic", 3)),
            run=("s2", "s2-h4"), rounds=1, synthetic=SyntheticConfig(num_users=30, items_per_subtopic=4),
            overrides={"model.backbone": tiny_backbone, "model.dim": 8, "model.max-tokens": 8, "model.max-history-items": 4,
                       "model.max-baskets": 2, "model.scorer-hidden": 8, "train.batch-size": 16},
        )
        settings = BenchSettings(data=DataConfig(), model=HierModelConfig(backbone=tiny_backbone), scaling=scaling)
        run_bench(suites=["scaling"], settings=settings, out=out, command="test", log=lambda *_: None)
    return out


def test_scaling_json_has_every_field(report) -> None:
    scaling = json.loads((report / "bench.json").read_text())["scaling"]
    assert [p["name"] for p in scaling["points"]] == ["s2", "s2-h4"]
    assert scaling["not_measured"] == [{"name": "s3", "data": "synthetic", "sites": 3, "history": 1, "reason": "not selected in this run"}]
    for p in scaling["points"]:
        assert POINT_FIELDS <= set(p) and MEMORY_FIELDS <= set(p["memory"]), p["name"]
        assert p["sites"] == 2 and p["dp"] is True and p["rounds"] == 1 and len(p["per_round"]) == 1
        assert p["round_seconds"] == pytest.approx(p["first_round_seconds"])  # one round: no steady rounds to average
        assert set(COMPONENTS) <= set(p["split"]) and all(v >= 0 for v in p["split"].values())
        assert p["split"]["site_training"] > 0 and p["split"]["server_evaluation"] > 0
        # the split accounts for the round's wall time
        assert sum(p["split"][c] for c in COMPONENTS) == pytest.approx(p["round_seconds"], rel=1e-6)
        assert p["memory"]["driver_peak_rss_mib"] > 50 and p["memory"]["workers"] >= 1
        assert p["memory"]["workers_sum_peak_rss_mib"] >= p["memory"]["worker_peak_rss_mib"] > 50
    short, long = scaling["points"]
    assert (long["max_history_items"], long["max_baskets"]) == (16, 8)  # ×4 widens the window the model sees
    assert long["baskets"] > 2 * short["baskets"] and long["mean_history_items"] > short["mean_history_items"]
    [g] = scaling["growth"]
    assert (g["from"], g["to"], g["axis"], g["ratio"]) == ("s2", "s2-h4", "history", 4)
    assert {"round", *COMPONENTS, "driver_memory", "workers_memory"} == set(g["costs"])
    md = (report / "bench.md").read_text()
    assert "| s2-h4 | 2 | ×4 /" in md and "| s3 | 3 | ×1 | not measured" in md and "s2 → s2-h4 (history length × 4.00)" in md
    assert (report / "scaling.png").stat().st_size > 1000


def test_growth_between_sites_is_a_power_law_exponent() -> None:
    def point(name, sites, round_seconds, added):
        split = {c: round_seconds / len(COMPONENTS) for c in COMPONENTS}
        memory = {"driver_added_mib": added, "workers_sum_peak_rss_mib": 100.0}
        return {"name": name, "data": "synthetic", "sites": sites, "history": 1, "round_seconds": round_seconds,
                "split": split, "memory": memory}

    [g] = growth([point("a", 4, 10.0, 40.0), point("b", 16, 40.0, 100.0)])
    assert g["axis"] == "sites" and g["ratio"] == 4
    assert g["costs"]["round"]["exponent"] == pytest.approx(1.0)  # 4 × the sites, 4 × the time: linear
    assert g["costs"]["workers_memory"]["exponent"] == pytest.approx(0.0)
    assert g["driver_mib_per_added_site"] == pytest.approx(60.0 / 12)
    assert math.isclose(g["costs"]["driver_memory"]["ratio"], 2.5)


def test_scaling_settings_reject_unknown_points_and_rounds() -> None:
    assert [p.name for p in scaling_settings(quick=True, overrides={}).points][:2] == ["synthetic-2", "synthetic-8"]
    assert scaling_settings(quick=False, overrides={"data.synthetic-users": 50}).synthetic.num_users == 50
    with pytest.raises(ConfigError, match="unknown scaling point 'nope'"):
        scaling_settings(quick=False, overrides={}, points="retail-4,nope")
    with pytest.raises(ConfigError, match="--rounds must be at least 1"):
        scaling_settings(quick=True, overrides={}, rounds=0)
