"""Run config: flat kebab-case keys with dotted groups (model.num-levels=3), read into typed configs."""

from __future__ import annotations

import dataclasses
import shlex
import typing
from collections.abc import Mapping

from hiermodel.errors import ConfigError

Scalar = typing.Union[str, int, float, bool]


def parse_overrides(text: str) -> dict[str, Scalar]:
    """'model.dim=32 train.epochs=5' -> {'model.dim': 32, 'train.epochs': 5} (values as TOML-ish scalars)."""
    out: dict[str, Scalar] = {}
    for token in shlex.split(text or ""):
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"run config entry {token!r} is not key=value (e.g. \"model.num-levels=2\")")
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
            raise ConfigError(f"unknown run config key {key!r}; valid {group}.* keys: {valid}")
        changes[attr] = _convert(key, value, hints[attr])
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run config group {group}: {exc}") from exc


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
            return [args[0](x) for x in items]
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run config key {key!r}: {value!r} is not a valid {getattr(hint, '__name__', hint)}") from None


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
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedyogi | fedtrimmedavg
    local_epochs: int = 1
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 1  # rounds wait until this many sites are connected
    round_timeout: float = 3600.0  # seconds the server waits for replies each round
    proximal_mu: float = 0.01  # fedprox
    server_lr: float = 0.01  # fedadam / fedyogi η
    trim_beta: float = 0.2  # fedtrimmedavg: share cut from each end
    personal_lambda: bool = False  # keep the combiner λ local to each site
    evaluate_split: str = "validation"  # what sites report in federated evaluation: validation | test
    server_eval_data: str = ""  # a saved data set the server evaluates the global model on each round
    out_dir: str = "runs/flwr"  # the run directory the server writes
    partitions_dir: str = ""  # simulation: the prepared partitions, one folder per partition-id

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"fed.rounds must be at least 1, got {self.rounds}")
        if self.local_epochs < 1:
            raise ConfigError(f"fed.local-epochs must be at least 1, got {self.local_epochs}")
        if self.evaluate_split not in ("validation", "test"):
            raise ConfigError(f"fed.evaluate-split must be validation or test, got {self.evaluate_split!r}")


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
                raise ConfigError(f"unknown run config key {key!r}; groups: {', '.join(g + '.*' for g in cls.GROUPS)}")
        dp = apply_group(DPConfig(), "dp", flat)
        model = apply_group(HierModelConfig(), "model", flat)
        if dp.enabled and model.use_popularity:
            # popularity counts every user of a site: a per-user DP bound cannot cover it
            model = dataclasses.replace(model, use_popularity=False)
        return cls(
            data=apply_group(DataConfig(), "data", flat),
            model=model,
            train=apply_group(TrainConfig(), "train", flat),
            fed=apply_group(FedConfig(), "fed", flat),
            dp=dp,
        )

    def to_flat(self) -> dict[str, Scalar]:
        out: dict[str, Scalar] = {}
        for group in self.GROUPS:
            out.update(to_flat(getattr(self, group), group))
        return out
