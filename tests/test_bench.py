"""`hierfed bench` on tiny inputs: every suite produces well-formed JSON with every field (no timing checks)."""

from __future__ import annotations

import json

from hiermodel.cli import main

FIELDS = {
    "speed": {"cached_step_seconds", "dp_step_seconds", "naive_step_seconds", "dp_over_non_dp", "naive_over_cached",
              "dp_frozen_projections_step_seconds", "dp_frozen_projections_over_non_dp", "dp_grad_sample_dtype",
              "cached_users_per_second", "dp_users_per_second", "encoding_items_per_second", "targets"},
    "communication": {"upload_bytes_per_client_round", "download_bytes_per_client_round", "backbone_bytes",
                      "full_model_fedavg_bytes", "upload_over_backbone", "trainable_parameters"},
}


def test_bench_writes_json_markdown_and_plot(tiny_backbone: str, tmp_path) -> None:
    out = tmp_path / "bench"
    # scaling runs whole simulations: tests/test_bench_scaling.py covers it on smaller inputs
    code = main(["bench", "--quick", "--suite", "speed,communication", "--backbone", tiny_backbone, "--out", str(out), "--run-config",
                 "data.synthetic-users=40 model.dim=8 model.max-tokens=8 model.max-history-items=8"])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["machine"]["cores"] >= 1
    for suite, fields in FIELDS.items():
        assert fields <= set(report[suite]), suite
        assert all(v > 0 for k, v in report[suite].items() if isinstance(v, float))
    assert 0 < report["communication"]["upload_over_backbone"] < 1
    assert "| upload (trainable state) |" in (out / "bench.md").read_text()
    assert (out / "speed.png").is_file()


def test_unknown_suite_is_one_line(tmp_path, capsys) -> None:
    assert main(["bench", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown bench suite 'nope'" in capsys.readouterr().err
