"""Run config: flat kebab-case keys with dotted groups (model.num-levels=3), read into typed configs."""

from __future__ import annotations

import dataclasses
import math
import shlex
import typing
from collections.abc import Mapping

from hiermodel.errors import ConfigError, quoted

Scalar = typing.Union[str, int, float, bool]


def parse_overrides(text: str) -> dict[str, Scalar]:
    """'model.dim=32 train.epochs=5' -> {'model.dim': 32, 'train.epochs': 5} (values as TOML-ish scalars)."""
    out: dict[str, Scalar] = {}
    try:
        tokens = shlex.split(text or "")
    except ValueError as exc:  # an unbalanced quote
        raise ConfigError(f"run config {text[:80]!r}: {exc}; quote each key=value (e.g. 'model.backbone=\"my model\"')") from None
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"run config entry {quoted(token)} is not key=value (e.g. \"model.num-levels=2\")")
        out[key.strip()] = _scalar(value.strip())
    return out


def _scalar(value: str) -> Scalar:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value.strip('"').strip("'")


def field_key(group: str, name: str) -> str:
    return f"{group}.{name.replace('_', '-')}"


def apply_group(config, group: str, values: Mapping[str, Scalar], *, strict: bool = True):
    """A copy of dataclass ``config`` with ``group.*`` keys of ``values`` applied, types checked."""
    fields = {f.name: f for f in dataclasses.fields(config) if f.name != "extra"}
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, value in values.items():
        prefix, _, name = key.partition(".")
        if prefix != group:
            continue
        attr = name.replace("-", "_")
        if attr not in fields:
            if not strict:
                continue
            valid = ", ".join(field_key(group, n) for n in fields)
            raise ConfigError(f"unknown run config key {quoted(key)}; valid {group}.* keys: {valid}")
        changes[attr] = _convert(key, value, hints[attr])
    try:
        config = dataclasses.replace(config, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run config group {group}: {exc}") from exc
    check_limits(config, group)
    return config


def _at_least(low: float) -> tuple:
    return (lambda v: v >= low), f"at least {low}"


def _one_of(*names: str) -> tuple:
    return (lambda v: v in names), "one of " + ", ".join(names)


_POSITIVE = ((lambda v: v > 0), "> 0")
_FRACTION = ((lambda v: 0 <= v <= 1), "between 0 and 1")
# Bounds of settings their config class does not check itself: a bad value stops here with one
# line, not deep in a run after the data was loaded and the catalogue encoded.
LIMITS: dict[str, tuple] = {
    **{f"data.{k}": _at_least(1) for k in ("synthetic-users", "synthetic-sites")},
    "data.session-gap-minutes": _POSITIVE,
    **{f"model.{k}": _at_least(1) for k in (
        "backbone-dim", "max-tokens", "dim", "max-history-items", "max-baskets", "max-basket-items", "scorer-hidden",
        "num-repeat-features", "num-features", "stats-dim")},
    **{f"model.{k}": _at_least(0) for k in ("num-topics", "level-loss-weight", "topic-loss-weight")},
    "model.text-scale": _POSITIVE,
    "model.combiner": _one_of("learned", "fixed", "validation"),
    **{f"train.{k}": _at_least(1) for k in ("epochs", "batch-size", "max-positives", "eval-batch-size")},
    **{f"train.{k}": _at_least(0) for k in ("weight-decay", "random-negatives", "in-batch-negatives", "patience")},
    "train.lr": _POSITIVE,
    "train.targets": _one_of("uniform", "latest", "all"),
    "train.negatives": _one_of("catalogue", "sampled"),
    "fed.min-nodes": _at_least(1),
    "fed.round-timeout": _POSITIVE,
    "fed.server-lr": _POSITIVE,
    "fed.proximal-mu": _at_least(0),
    "fed.lr-final": ((lambda v: 0 < v <= 1), "in (0, 1] (1: a constant learning rate)"),
    "fed.fraction-train": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "fed.fraction-evaluate": _FRACTION,
    "fed.trim-beta": ((lambda v: 0 <= v < 0.5), "in [0, 0.5)"),
    "dp.random-negatives": _at_least(0),
    "dp.baskets-per-user": _at_least(1),
    "dp.head-clip-share": ((lambda v: 0 <= v < 1), "in [0, 1) (0: one clip norm for all values)"),
    "dp.popularity-weeks": _at_least(0),
    "dp.popularity-start": ((lambda v: v >= 0), "at least 0 (Unix seconds of the week grid's first day)"),
    "dp.negatives": _one_of("catalogue", "sampled"),
    "dp.popularity-share": ((lambda v: 0 <= v < 1), "in [0, 1) (0: no popularity features under DP)"),
    "dp.central-target-epsilon": _POSITIVE,
    "dp.central-clip-norm": _POSITIVE,
    "dp.central-noise-multiplier": _at_least(0),
    "dp.central-target-delta": ((lambda v: 0 <= v < 1), "in [0, 1) (0: 1 / (10 × the sites connected))"),
}


def check_limits(config, group: str) -> None:
    """ConfigError naming the first ``group.*`` setting of ``config`` outside its bounds."""
    for f in dataclasses.fields(config):
        key = field_key(group, f.name)
        if key in LIMITS:
            valid, what = LIMITS[key]
            value = getattr(config, f.name)
            if not valid(value):
                raise ConfigError(f"run config key {key!r} must be {what}, got {quoted(value)}")
    lam = getattr(config, "fixed_lambda", None) if group == "model" else None
    if lam is not None and (len(lam) != config.num_levels or min(lam) < 0 or sum(lam) <= 0):
        raise ConfigError(
            f"model.fixed-lambda {','.join(map(str, lam))}: give {config.num_levels} non-negative weights "
            f"(one per level, model.num-levels={config.num_levels}), e.g. model.fixed-lambda=0.2,0.3,0.5"
        )


def _convert(key: str, value: Scalar, hint) -> object:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        if value in ("", "none", "None"):
            return None
        hint, origin, args = args[0], typing.get_origin(args[0]), typing.get_args(args[0])
    try:
        if origin is list:
            items = value.split(",") if isinstance(value, str) else [value]
            converted = [args[0](x) for x in items]
            if any(isinstance(x, float) and not math.isfinite(x) for x in converted):
                raise ValueError
            return converted
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError  # int(True) would be 1
        if hint is float and not math.isfinite(float(value)):
            raise ConfigError(f"run config key {key!r}: {quoted(value)} is not a finite number")
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run config key {key!r}: {quoted(value)} is not a valid {getattr(hint, '__name__', hint)}") from None


def to_flat(config, group: str) -> dict[str, Scalar]:
    """The dataclass as flat run config entries (lists as comma-separated strings, None as '')."""
    out: dict[str, Scalar] = {}
    for f in dataclasses.fields(config):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[field_key(group, f.name)] = "" if value is None else value
    return out


@dataclasses.dataclass
class FedConfig:
    """Federated rounds (run config group `fed.*`)."""

    rounds: int = 3
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedyogi | fedtrimmedavg | fedmedian | krum | bulyan
    local_epochs: int = 1
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 1  # rounds wait until this many sites are connected
    round_timeout: float = 3600.0  # seconds the server waits for replies each round
    proximal_mu: float = 0.01  # fedprox
    server_lr: float = 0.01  # fedadam / fedyogi η
    trim_beta: float = 0.2  # fedtrimmedavg: share cut from each end
    malicious_sites: int = 1  # krum / bulyan: how many poisoned sites to tolerate
    max_update_norm: float = 0.0  # reject a site whose update (its state - the global one) is longer; 0: no bound
    # the sites' learning rate falls by a cosine from train.lr in round 1 to lr-final × train.lr in the
    # last planned round (1: constant)
    lr_final: float = 1.0
    personal_lambda: bool = False  # keep the combiner λ local to each site
    evaluate_split: str = "validation"  # what sites report in federated evaluation: validation | test
    server_eval_data: str = ""  # a saved data set the server evaluates the global model on each round
    out_dir: str = "runs/flwr"  # the run directory the server writes
    partitions_dir: str = ""  # simulation: the prepared partitions, one folder per partition-id
    run_id: str = ""  # set by the server at the start; sites key their saved privacy state by it
    resume: bool = False  # continue the run in out-dir from its last completed round

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"fed.rounds must be at least 1, got {self.rounds}")
        if self.local_epochs < 1:
            raise ConfigError(f"fed.local-epochs must be at least 1, got {self.local_epochs}")
        if self.malicious_sites < 0 or self.max_update_norm < 0:
            raise ConfigError("fed.malicious-sites and fed.max-update-norm must be >= 0")
        if self.evaluate_split not in ("validation", "test"):
            raise ConfigError(f"fed.evaluate-split must be validation or test, got {self.evaluate_split!r}")


def check_central_dp_strategy(fed: FedConfig) -> None:
    """Flower's accounted central DP wrappers need a strategy that averages the sites' updates uniformly."""
    if fed.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"dp.central needs fed.strategy fedavg or fedprox (Flower's accounted central DP averages "
                          f"the sites' updates uniformly), got {fed.strategy!r}")


@dataclasses.dataclass
class RunConfig:
    """Every setting of a run, typed: what the flat Flower run config (`group.key = value`) holds."""

    data: "object"
    model: "object"
    train: "object"
    fed: FedConfig
    dp: "object"

    GROUPS = ("data", "model", "train", "fed", "dp")

    @classmethod
    def from_flat(cls, flat: Mapping[str, Scalar]) -> "RunConfig":
        from hiermodel.data_config import DataConfig
        from hiermodel.model import HierModelConfig
        from hiermodel.privacy import DPConfig
        from hiermodel.training import TrainConfig

        for key in flat:
            if key.partition(".")[0] not in cls.GROUPS:
                raise ConfigError(f"unknown run config key {quoted(key)}; groups: {', '.join(g + '.*' for g in cls.GROUPS)}")
        dp = apply_group(DPConfig(), "dp", flat)
        model = apply_group(HierModelConfig(), "model", flat)
        if dp.enabled and model.use_popularity and not dp.popularity_share:
            # plain popularity counts every user of a site: under DP only its DP release may be used
            model = dataclasses.replace(model, use_popularity=False)
        fed = apply_group(FedConfig(), "fed", flat)
        if dp.central != "off":
            check_central_dp_strategy(fed)
        return cls(
            data=apply_group(DataConfig(), "data", flat),
            model=model,
            train=apply_group(TrainConfig(), "train", flat),
            fed=fed,
            dp=dp,
        )

    def to_flat(self) -> dict[str, Scalar]:
        out: dict[str, Scalar] = {}
        for group in self.GROUPS:
            out.update(to_flat(getattr(self, group), group))
        return out
