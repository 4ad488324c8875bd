"""`hierfed bench`: figures measured side by side in one run (never in timed tests).

Suites so far: speed (cached-encoding training against the naive pipeline that runs the backbone
on the raw text at every step, DP against non-DP steps of the same model and batches, encoding
throughput) and communication (bytes per client per round against the backbone and a full-model
FedAvg). Each writes into one JSON report, a Markdown section and a PNG.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hiermodel.data.split import Example, train_targets_by_user
from hiermodel.data_config import DataConfig
from hiermodel.encoding_cache import load_backbone
from hiermodel.errors import ConfigError
from hiermodel.model import HierModelConfig
from hiermodel.pipeline import new_model, prepare
from hiermodel.plots import plot_series
from hiermodel.privacy import DPConfig, PrivacyPlan, grad_sample_dtype
from hiermodel.training import TrainConfig, make_optimizer

SUITES = ("speed", "communication", "scaling", "quality")


@dataclass
class BenchSettings:
    data: DataConfig
    model: HierModelConfig
    batch_size: int = 64
    steps: int = 24  # timed steps per pipeline (after one warm-up step); the median of 8 moved a ratio by ± 0.1
    naive_steps: int = 2
    encode_items: int = 512
    seed: int = 0
    scaling: object = None  # simulation.bench_scaling.ScalingSettings (None: its defaults)
    quality: object = None  # simulation.bench_quality.QualitySettings (None: its defaults)


def machine() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"cores": os.cpu_count(), "memory_gib": round(memory / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _batches(builder, settings: BenchSettings, count: int) -> list[list[Example]]:
    """The same user batches for every pipeline: one uniformly drawn target basket per user."""
    rng = np.random.default_rng(settings.seed)
    targets = train_targets_by_user(builder.dataset)
    users = np.fromiter(targets, dtype=np.int64)
    if len(users) < 1:
        raise ConfigError("the benchmark data has no user with a training basket")
    return [
        [Example(int(u), int(rng.choice(targets[int(u)]))) for u in rng.choice(users, size=min(settings.batch_size, len(users)), replace=False)]
        for _ in range(count)
    ]


def _median_seconds(steps: dict, batches: list) -> dict[str, float]:
    """Median seconds per step of each pipeline, timed in turns on each batch, so that a change in the
    machine's speed during the run (other jobs, clocks) reaches every pipeline alike."""
    for step in steps.values():
        step(batches[0])  # warm-up: allocations, lazy imports
    times: dict[str, list[float]] = {name: [] for name in steps}
    for batch in batches:
        for name, step in steps.items():
            started = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def speed_suite(settings: BenchSettings, *, log=print) -> dict:
    dataset = settings.data.load()
    config, builder = prepare(dataset, settings.model, progress=False)
    batches = _batches(builder, settings, settings.steps)
    train = TrainConfig(batch_size=settings.batch_size)
    rng = np.random.default_rng(settings.seed)

    def plain_model():
        model = new_model(config, seed=settings.seed)
        return model, make_optimizer(model, train)

    model, optimizer = plain_model()

    def cached_step(examples) -> None:
        history, candidates = builder.training_batch(examples, rng=rng, negatives="catalogue")
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(history, candidates).loss.backward()
        optimizer.step()

    from hiermodel.privacy import private_round

    targets = {ex.user: [ex.target] for ex in batches[0]}
    plan = PrivacyPlan(noise_multiplier=1.0, sample_rate=1.0, steps_per_round=1, delta=1e-5, budget_epsilon=1e9,
                       clip_norm=1.0, accountant="prv", users=len(targets))

    def dp_step_for(frozen: str):
        dp_model, dp_optimizer = plain_model()

        def dp_step(examples) -> None:
            # q = 1 over exactly this batch's users: the same users and targets as the plain step
            private_round(dp_model, builder, plan=plan, optimizer=dp_optimizer, targets={e.user: [e.target] for e in examples},
                          negatives=DPConfig().negatives, random_negatives=0, rng=rng, frozen=frozen,
                          precision=DPConfig().grad_sample_precision)

        return dp_step

    timed = _median_seconds({"cached": cached_step, "dp": dp_step_for("none"), "dp_frozen": dp_step_for("projections")},
                            batches)
    cached, dp, dp_frozen = timed["cached"], timed["dp"], timed["dp_frozen"]
    log(f"speed: cached non-DP step {cached * 1000:.0f} ms")
    log(f"speed: DP step {dp * 1000:.0f} ms ({dp / cached:.2f} × non-DP)")
    log(f"speed: DP step, dp.frozen=projections {dp_frozen * 1000:.0f} ms ({dp_frozen / cached:.2f} × non-DP)")

    backbone = load_backbone(config.backbone, config.max_tokens)
    texts = dataset.catalogue.texts

    def naive_step(examples) -> None:
        # what a pipeline without the cache does: run the LM on every history and candidate text, then train
        history, candidates = builder.training_batch(examples, rng=rng, negatives="catalogue")
        ids = history.item_ids[history.item_ids >= 0].tolist()
        backbone.encode([texts[i] for i in ids])
        for start in range(0, len(texts), 256):
            backbone.encode(texts[start : start + 256])
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(history, candidates).loss.backward()
        optimizer.step()

    naive = _median_seconds({"naive": naive_step}, batches[: settings.naive_steps])["naive"]
    log(f"speed: naive step {naive:.2f} s ({naive / cached:.0f} × cached)")

    sample = texts[: settings.encode_items]
    started = time.perf_counter()
    for start in range(0, len(sample), 64):
        backbone.encode(sample[start : start + 64])
    encode_rate = len(sample) / (time.perf_counter() - started)
    log(f"speed: encoding {encode_rate:.0f} items/s")
    users = len(batches[0])
    return {
        "data": dataset.name, "items": dataset.num_items, "batch_users": users,
        "cached_step_seconds": cached, "dp_step_seconds": dp, "dp_frozen_projections_step_seconds": dp_frozen,
        "naive_step_seconds": naive,
        "cached_users_per_second": users / cached, "dp_users_per_second": users / dp,
        "naive_users_per_second": users / naive,
        "dp_over_non_dp": dp / cached, "dp_frozen_projections_over_non_dp": dp_frozen / cached,
        "naive_over_cached": naive / cached,
        "encoding_items_per_second": encode_rate,
        # dp.grad-sample-precision as this machine resolves it: the DP step's figure depends on it
        "dp_grad_sample_dtype": str(grad_sample_dtype(DPConfig().grad_sample_precision)).removeprefix("torch."),
        "targets": {"naive_over_cached_min": 50.0, "dp_over_non_dp_max": 1.3},
    }


def communication_suite(settings: BenchSettings, *, log=print) -> dict:
    from flwr.app import Array, ArrayRecord

    from server.global_model import server_model_config

    config = server_model_config(settings.model)
    state = new_model(config).trainable_state()
    trainable = ArrayRecord({k: Array(v) for k, v in state.items()}).count_bytes()
    backbone = load_backbone(config.backbone, config.max_tokens)
    backbone_bytes = backbone.num_bytes()
    log(f"communication: {trainable:,} bytes per client per round each way; backbone {backbone_bytes:,} bytes")
    return {
        "upload_bytes_per_client_round": trainable,
        "download_bytes_per_client_round": trainable,
        "backbone_bytes": backbone_bytes,
        "full_model_fedavg_bytes": backbone_bytes + trainable,
        "upload_over_backbone": trainable / backbone_bytes,
        "trainable_parameters": int(sum(v.size for v in state.values())),
        "backbone_parameters": backbone.num_parameters(),
        "targets": {"upload_over_backbone_max": 0.02},
    }


def markdown(report: dict, command: str) -> str:
    lines = [f"## `hierfed bench` ({', '.join(s for s in SUITES if s in report)})", "",
             f"Command: `{command}`. Machine: {report['machine']['cores']} cores, {report['machine']['memory_gib']} GiB, "
             f"torch {report['machine']['torch']}.", ""]
    if "speed" in report:
        s = report["speed"]
        lines += [
            f"Speed on {s['data']} ({s['items']:,} items), batches of {s['batch_users']} users, full-catalogue softmax:", "",
            "| pipeline | step (ms) | users/s | ratio | target |", "|---|---|---|---|---|",
            f"| cached encodings, non-DP | {s['cached_step_seconds'] * 1000:.0f} | {s['cached_users_per_second']:.0f} | 1 | |",
            f"| cached encodings, DP-SGD (the item tower's per-user products in {s['dp_grad_sample_dtype']}) | {s['dp_step_seconds'] * 1000:.0f} | {s['dp_users_per_second']:.0f} | "
            f"{s['dp_over_non_dp']:.2f} × non-DP | ≤ 1.3 {'met' if s['dp_over_non_dp'] <= 1.3 else '**not met**'} |",
            f"| cached encodings, DP-SGD with `dp.frozen=projections` (the text projections not trained) | "
            f"{s['dp_frozen_projections_step_seconds'] * 1000:.0f} | {s['batch_users'] / s['dp_frozen_projections_step_seconds']:.0f} | "
            f"{s['dp_frozen_projections_over_non_dp']:.2f} × non-DP (which trains them) | |",
            f"| naive (backbone on the raw text every step) | {s['naive_step_seconds'] * 1000:.0f} | {s['naive_users_per_second']:.1f} | "
            f"cached is {s['naive_over_cached']:.0f} × faster | ≥ 50 {'met' if s['naive_over_cached'] >= 50 else '**not met**'} |",
            "", f"Encoding throughput of the backbone: {s['encoding_items_per_second']:.0f} items/s.", ""]
    if "communication" in report:
        c = report["communication"]
        lines += [
            "| payload per client per round | bytes | share of the backbone |", "|---|---|---|",
            f"| upload (trainable state) | {c['upload_bytes_per_client_round']:,} | {c['upload_over_backbone']:.2%} (target ≤ 2%: "
            f"{'met' if c['upload_over_backbone'] <= 0.02 else '**not met**'}) |",
            f"| download (global trainable state) | {c['download_bytes_per_client_round']:,} | {c['upload_over_backbone']:.2%} |",
            f"| full-model FedAvg (backbone + heads) | {c['full_model_fedavg_bytes']:,} | {c['full_model_fedavg_bytes'] / c['backbone_bytes']:.0%} |",
            ""]
    if "scaling" in report:
        from simulation.bench_scaling import markdown as scaling_markdown

        lines += scaling_markdown(report["scaling"])
    if "quality" in report:
        from simulation.bench_quality import quality_markdown

        lines += quality_markdown(report["quality"])
    return "\n".join(lines)


def run_bench(*, suites: list[str], settings: BenchSettings, out: Path, command: str, log=print) -> dict:
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ConfigError(f"unknown bench suite {unknown[0]!r}; valid: {', '.join(SUITES)}")
    if "quality" in suites:  # a table --resume / --resume-from cannot keep stops the bench before any suite runs
        from simulation.bench_quality import QualitySettings, check_earlier_tables

        check_earlier_tables(settings.data, settings.model, settings.quality or QualitySettings(), out=out)
    started = time.perf_counter()
    report: dict = {"machine": machine(), "command": command}
    if "speed" in suites:
        report["speed"] = speed_suite(settings, log=log)
    if "communication" in suites:
        report["communication"] = communication_suite(settings, log=log)
    if "scaling" in suites:
        from simulation.bench_scaling import ScalingSettings, scaling_suite

        report["scaling"] = scaling_suite(settings.scaling or ScalingSettings(), out / "scaling", log=log)
    if "quality" in suites:  # writes quality/ (one folder per federated run, quality.json as it goes) and quality.png
        from simulation.bench_quality import QualitySettings, quality_suite

        report["quality"] = quality_suite(settings.data, settings.model, settings.quality or QualitySettings(), out=out, log=log)
    report["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown(report, command))
    if "speed" in report:
        s = report["speed"]
        plot_series(out / "speed.png", x=[0, 1, 2], xlabel="pipeline (0 cached, 1 DP, 2 naive)",
                    panels={"users per second": {"users/s": [s["cached_users_per_second"], s["dp_users_per_second"],
                                                             s["naive_users_per_second"]]}})
    if "scaling" in report:
        from simulation.bench_scaling import plot as plot_scaling

        plot_scaling(out / "scaling.png", report["scaling"])
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}")
    return report
