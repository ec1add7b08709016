"""The only reader of params.yaml: frozen dataclasses, every key and value checked before any work."""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from pipeline.errors import PipelineError

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(PipelineError):
    """A bad key or value in params.yaml."""


def _bound(text: str, test: typing.Callable[[Any], bool]) -> Any:
    return field(metadata={"expected": text, "test": test})


def _positive() -> Any:
    return _bound("a number > 0", lambda value: value > 0)


def _at_least(low: int) -> Any:
    return _bound(f"an integer >= {low}", lambda value: value >= low)


def _fraction() -> Any:
    return _bound("a number between 0 and 1", lambda value: 0 <= value <= 1)


def _non_negative() -> Any:
    return _bound("a number >= 0", lambda value: value >= 0)


@dataclass(frozen=True)
class DataParams:
    dataset: str
    sources: tuple[str, ...]
    timeout_s: float = _positive()
    # SHA-256 of the decompressed IDX files, only for a dataset that is not built in.
    sha256: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PrepareParams:
    normalize: bool


@dataclass(frozen=True)
class MlflowParams:
    experiment: str
    registered_model: str


@dataclass(frozen=True)
class TrainParams:
    impl: Literal["module", "scratch"]
    hidden: tuple[int, ...] = _bound("a list of integers >= 1", lambda sizes: all(size >= 1 for size in sizes))
    activation: Literal["relu", "sigmoid", "tanh", "leaky_relu"]
    init_std: float = _positive()
    optimizer: Literal["sgd", "adam", "adagrad", "rmsprop"]
    loss: Literal["cross_entropy", "mse", "l1"]
    lr: float = _positive()
    batch_size: int = _at_least(1)
    epochs: int = _at_least(1)
    seed: int = _at_least(0)
    device: Literal["auto", "cpu", "cuda", "mps"]


@dataclass(frozen=True)
class EvaluateParams:
    max_train_loss: float = _positive()
    min_train_accuracy: float = _fraction()
    min_test_accuracy: float = _fraction()


@dataclass(frozen=True)
class LinregParams:
    true_w: tuple[float, ...] = _bound("a non-empty list of numbers", lambda weights: len(weights) >= 1)
    true_b: float
    noise_std: float = _non_negative()
    examples: int = _at_least(1)
    batch_size: int = _at_least(1)
    lr: float = _positive()
    epochs: int = _at_least(1)
    seed: int = _at_least(0)


@dataclass(frozen=True)
class SpiralParams:
    classes: int = _at_least(2)
    points_per_class: int = _at_least(2)
    noise: float = _non_negative()
    test_fraction: float = _bound("a number > 0 and < 1", lambda value: 0 < value < 1)
    activations: tuple[Literal["relu", "sigmoid", "tanh", "leaky_relu"], ...] = _bound(
        "a non-empty list without repeats", lambda names: 0 < len(names) == len(set(names)))
    hidden: int = _at_least(1)
    lr: float = _positive()
    steps: int = _at_least(1)
    seed: int = _at_least(0)


@dataclass(frozen=True)
class Params:
    data: DataParams
    prepare: PrepareParams
    mlflow: MlflowParams
    train: TrainParams
    variants: Mapping[str, TrainParams]
    evaluate: EvaluateParams
    # Optional: a params file for another pipeline (lessons/mnist/params.yaml) leaves the lessons out.
    linreg: LinregParams | None
    spiral: SpiralParams | None

    def section(self, name: str) -> Any:
        """An optional section that a stage needs."""
        if getattr(self, name) is None:
            raise ParamsError(f"{name}: missing key")
        return getattr(self, name)

    def variant(self, name: str) -> TrainParams:
        if name not in self.variants:
            raise ParamsError(f"variants.{name}: no such variant; expected one of {sorted(self.variants)}")
        return self.variants[name]


OPTIONAL_SECTIONS = ("linreg", "spiral")


def stage_parser(doc: str) -> argparse.ArgumentParser:
    """A stage's command line: the first line of its docstring, and where params.yaml is."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    return parser


def load(path: Path = DEFAULT_PARAMS) -> Params:
    """Read and check params.yaml; raise ParamsError naming the first bad key."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ParamsError(f"{path}: cannot read: {' '.join(str(error).split())}") from None
    raw = _expect_mapping(raw, "params.yaml")
    _check_keys(raw, [f.name for f in dataclasses.fields(Params)], "", optional=OPTIONAL_SECTIONS)
    return Params(
        data=_check_data(build(DataParams, raw["data"], "data")),
        prepare=build(PrepareParams, raw["prepare"], "prepare"),
        mlflow=build(MlflowParams, raw["mlflow"], "mlflow"),
        train=build(TrainParams, raw["train"], "train"),
        variants=_build_variants(raw["train"], raw["variants"]),
        evaluate=build(EvaluateParams, raw["evaluate"], "evaluate"),
        linreg=build(LinregParams, raw["linreg"], "linreg") if "linreg" in raw else None,
        spiral=build(SpiralParams, raw["spiral"], "spiral") if "spiral" in raw else None,
    )


def build(cls: type, raw: Any, path: str) -> Any:
    """Make dataclass `cls` from a mapping, checking keys, types and ranges."""
    raw = _expect_mapping(raw, path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(raw, list(fields), path, optional=("sha256",))
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = f"{path}.{name}"
        values[name] = _convert(value, hints[name], key)
        expected, test = fields[name].metadata.get("expected"), fields[name].metadata.get("test")
        if test is not None and not test(values[name]):
            raise ParamsError(f"{key}: got {value!r}, expected {expected}")
    return cls(**values)


def _build_variants(defaults: dict, raw: Any) -> dict[str, TrainParams]:
    """Each variant is the train defaults with its overrides, checked like train itself."""
    raw = _expect_mapping(raw, "variants")
    if not raw:
        raise ParamsError("variants: got an empty mapping, expected at least one variant")
    variants = {}
    for name, overrides in raw.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
            raise ParamsError(f"variants.{name}: bad variant name, expected letters, digits, '_' or '-'")
        overrides = _expect_mapping(overrides if overrides is not None else {}, f"variants.{name}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainParams)})
        if unknown:
            raise ParamsError(f"variants.{name}.{unknown[0]}: unknown key, expected one of the train keys "
                              f"{[f.name for f in dataclasses.fields(TrainParams)]}")
        variants[str(name)] = build(TrainParams, {**defaults, **overrides}, f"variants.{name}")
    return variants


def _check_data(data: DataParams) -> DataParams:
    from pipeline.datasets import BUILT_IN, FILE_KINDS

    if data.dataset in BUILT_IN:
        if data.sha256:
            raise ParamsError(f"data.sha256: {data.dataset} has hashes pinned in code; expected an empty mapping")
    elif set(data.sha256) != set(FILE_KINDS):
        raise ParamsError(f"data.dataset: got {data.dataset!r}, expected one of {sorted(BUILT_IN)} "
                          f"or data.sha256 pinning all of {list(FILE_KINDS)}")
    return data


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{key}: got {value!r}, expected one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: got {value!r}, expected a list")
        return tuple(_convert(item, args[0], f"{key}[{index}]") for index, item in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        value = _expect_mapping(value if value is not None else {}, key)
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return _convert_scalar(value, hint, key)


def _convert_scalar(value: Any, hint: type, key: str) -> Any:
    # bool is an int in Python, and YAML reads "1e-3" as a string: handle both explicitly.
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)
    if hint is str and isinstance(value, str) and value:
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}[hint]
    raise ParamsError(f"{key}: got {value!r}, expected {expected}")


def _expect_mapping(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise ParamsError(f"{path}: got {value!r}, expected a mapping of keys to values")
    return value


def _check_keys(raw: dict, expected: list[str], path: str, optional: tuple[str, ...]) -> None:
    prefix = f"{path}." if path else ""
    for key in raw:
        if key not in expected:
            raise ParamsError(f"{prefix}{key}: unknown key, expected one of {expected}")
    for key in expected:
        if key not in raw and key not in optional:
            raise ParamsError(f"{prefix}{key}: missing key")
