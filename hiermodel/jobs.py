"""The model-library jobs behind `hierfed data|train|evaluate|recommend`; each writes plain files."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

from hiermodel.baselines import build_baseline
from hiermodel.data.dataset import Dataset
from hiermodel.data_config import DataConfig
from hiermodel.durable_files import atomic_write_text
from hiermodel.errors import ConfigError
from hiermodel.evaluation import evaluate_ranker
from hiermodel.features import FeatureBuilder
from hiermodel.model import HierModel, HierModelConfig
from hiermodel.pipeline import new_model, prepare
from hiermodel.plots import plot_training_curves
from hiermodel.ranker import HierRanker
from hiermodel.training import TrainConfig, choose_lambda_on_validation, fit

MODEL_DIR = "model"
DATA_FILE = "data.json"


def write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2, default=_jsonable))


def _jsonable(value: object) -> object:
    if hasattr(value, "tolist"):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def evaluate_baselines(dataset: Dataset, names: Sequence[str], *, item_vectors=None, split: str = "test") -> dict[str, dict]:
    """Each named baseline's metrics on the split, through the same evaluation code as the model."""
    return {
        name: evaluate_ranker(build_baseline(name, dataset=dataset, item_vectors=item_vectors), dataset, split=split)
        for name in names
    }


def train_job(
    *,
    data: DataConfig,
    model_config: HierModelConfig,
    train_config: TrainConfig,
    out: Path,
    baselines: Sequence[str] = ("gpop", "ppop"),
    log=print,
) -> dict:
    """Train centrally, early-stopped on validation; write the model, metrics.json and curves."""
    started = time.perf_counter()
    dataset = data.load()
    log(f"data: {json.dumps(dataset.summary())}")
    config, builder = prepare(dataset, model_config)
    encoded = time.perf_counter()
    model = new_model(config, seed=train_config.seed)
    log(f"model: {model.num_trainable_parameters():,} trainable parameters, levels {', '.join(model.level_names)}")

    def on_epoch(row: dict) -> None:
        lam = " ".join(f"{k[7:]}={v:.2f}" for k, v in row.items() if k.startswith("lambda_"))
        log(f"epoch {row['epoch']:>3}  loss {row['loss']:.4f}  val ndcg@10 {row['val_ndcg@10']:.4f}  "
            f"recall@20 {row['val_recall@20']:.4f}  explore@20 {row['val_explore_recall@20']:.4f}  λ {lam}  "
            f"({row['train_seconds']:.1f}s + {row['eval_seconds']:.1f}s eval)")

    result = fit(model, builder, train_config, on_epoch=on_epoch)
    chosen = None
    if config.combiner == "validation":
        chosen, _ = choose_lambda_on_validation(model, builder)
        log(f"λ chosen on validation: {chosen}")
    ranker = HierRanker(model, builder, batch_size=train_config.eval_batch_size)
    test = evaluate_ranker(ranker, dataset, split="test")
    trained = time.perf_counter()
    base = evaluate_baselines(dataset, baselines, item_vectors=builder.encodings.sentence.float().numpy())
    model.save_pretrained(out / MODEL_DIR)
    write_json(out / MODEL_DIR / DATA_FILE, dataclasses.asdict(data))
    metrics = {
        "test": test,
        "validation": result.best_validation,
        "best_epoch": result.best_epoch,
        "chosen_lambda": chosen,
        "baselines": base,
        "history": result.history,
        "data": dataset.summary(),
        "trainable_parameters": model.num_trainable_parameters(),
        "seconds": {"encoding": encoded - started, "training": trained - encoded, "total": time.perf_counter() - started},
    }
    write_json(out / "run_config.json", {"data": dataclasses.asdict(data), "model": dataclasses.asdict(config),
                                         "train": dataclasses.asdict(train_config)})
    write_json(out / "metrics.json", metrics)
    plot_training_curves(out / "training_curves.png", result.history)
    log(format_table({"hiermodel": test, **base}))
    log(f"wrote {out / MODEL_DIR}, {out / 'metrics.json'}, {out / 'training_curves.png'}")
    return metrics


def find_model_dir(path: Path) -> Path:
    """A model folder, or a run folder holding one under model/."""
    for candidate in (path, path / MODEL_DIR):
        if (candidate / "config.json").exists() and (candidate / "model.safetensors").exists():
            return candidate
    raise ConfigError(f"no hierfed model in {path} (expected config.json + model.safetensors); pass the folder `hierfed train` wrote")


def load_model_and_data(model_path: Path, data: DataConfig | None) -> tuple[HierModel, FeatureBuilder, Dataset]:
    """The saved model, its data (as trained, unless overridden) and a feature builder on it."""
    folder = find_model_dir(model_path)
    model = HierModel.from_pretrained(folder)
    if data is None:
        data_file = folder / DATA_FILE
        if not data_file.exists():
            raise ConfigError(f"{folder} does not say which data it was trained on; pass --dataset")
        data = DataConfig(**json.loads(data_file.read_text()))
    dataset = data.load()
    _, builder = prepare(dataset, model.config)
    return model, builder, dataset


def evaluate_job(*, model_path: Path, data: DataConfig | None, split: str, baselines: Sequence[str]) -> dict:
    model, builder, dataset = load_model_and_data(model_path, data)
    results = {"hiermodel": evaluate_ranker(HierRanker(model, builder), dataset, split=split)}
    results.update(evaluate_baselines(dataset, baselines, item_vectors=builder.encodings.sentence.float().numpy(), split=split))
    return results


def format_table(results: dict[str, dict], columns: Sequence[str] = ("ndcg@10", "recall@10", "recall@20", "mrr", "explore_recall@20")) -> str:
    """A plain-text table, one row per method."""
    width = max(len(name) for name in results) + 2
    lines = ["method".ljust(width) + "".join(c.rjust(19) for c in columns)]
    for name, row in results.items():
        lines.append(name.ljust(width) + "".join(f"{row.get(c, float('nan')):19.4f}" for c in columns))
    return "\n".join(lines)
