"""The only reader of params.yaml: frozen pydantic dataclasses, every key and value checked before any work.

A bad key or value stops a stage with one line naming it: `<key path>: got <value>, expected <what>`.
Pydantic checks types, ranges and unknown or missing keys; the code here checks only what it cannot:
keys given twice in the YAML, checks across sections (dataset sizes, memory), and the one-line message.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import re
import reprlib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from pipeline import datasets
from pipeline.errors import PipelineError

DEFAULT_PARAMS = Path("params.yaml")
INT64_END = 2**63
Model = TypeVar("Model")


class ParamsError(PipelineError):
    """A bad key or value in params.yaml."""


def _distinct(values: tuple) -> tuple:
    if len(set(values)) != len(values):
        raise ValueError("repeated items")
    return values


# Strict: YAML's `yes` or 1 is not a bool, 2.5 is not an int; a float accepts an int. Ints fit in int64 (torch's seeds).
Integer = Annotated[int, Strict(), Field(lt=INT64_END)]
Number = Annotated[float, Strict()]
Text = Annotated[str, Strict(), Field(min_length=1)]
Flag = Annotated[bool, Strict()]
Count = Annotated[Integer, Field(ge=1, description="an integer >= 1")]
Seed = Annotated[Integer, Field(ge=0, description="an integer >= 0 and < 2**63")]
NonNegativeInteger = Annotated[Integer, Field(ge=0, description="an integer >= 0")]
PositiveNumber = Annotated[Number, Field(gt=0, description="a number > 0")]
NonNegativeNumber = Annotated[Number, Field(ge=0, description="a number >= 0")]
Fraction = Annotated[Number, Field(ge=0, le=1, description="a number between 0 and 1")]
Seeds = Annotated[tuple[Seed, ...], Field(min_length=1), AfterValidator(_distinct),
                  Field(description="a non-empty list of distinct integers >= 0 and < 2**63")]
# DVC writes train@<name> and a shell passes --variant <name>: no spaces, '@', '/', ':' or '.'.
VariantName = Annotated[str, Strict(), Field(
    pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
    description="a name of letters, digits, '_' or '-' that starts with a letter or digit")]
Activation = Literal["relu", "sigmoid", "tanh", "leaky_relu"]

params_class = functools.partial(dataclass, frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))


@params_class
class SplitCounts:
    train: Count
    test: Count


@params_class
class DataParams:
    dataset: Text
    sources: tuple[Text, ...]
    timeout_s: PositiveNumber
    min_kbytes_per_s: PositiveNumber
    # Only for a dataset that is not built in: SHA-256 of its decompressed IDX files, and (optional) its sizes.
    sha256: dict[Text, Text] = dataclasses.field(default_factory=dict)
    counts: SplitCounts | None = None

    def spec(self) -> datasets.DatasetSpec:
        """The dataset these params name, with their sources (and, for one not built in, hashes and counts)."""
        counts = dataclasses.asdict(self.counts) if self.counts else None
        return datasets.resolve(self.dataset, self.sources, self.sha256, counts)


@params_class
class PrepareParams:
    normalize: Flag
    validation: NonNegativeInteger
    seed: Seed


@params_class
class MlflowParams:
    experiment: Text
    registered_model: Text


@params_class
class TrainParams:
    impl: Literal["module", "scratch"]
    hidden: tuple[Count, ...]
    activation: Activation
    init_std: PositiveNumber
    optimizer: Literal["sgd", "adam", "adagrad", "rmsprop"]
    loss: Literal["cross_entropy", "mse", "l1"]
    lr: PositiveNumber
    batch_size: Count
    epochs: Count
    seeds: Seeds
    device: Literal["auto", "cpu", "cuda", "mps"]


@params_class
class EvaluateParams:
    max_train_loss: PositiveNumber
    min_train_accuracy: Fraction
    min_test_accuracy: Fraction


@params_class
class LinregParams:
    true_w: Annotated[tuple[Number, ...], Field(min_length=1, description="a non-empty list of numbers")]
    true_b: Number
    noise_std: NonNegativeNumber
    examples: Count
    batch_size: Count
    lr: PositiveNumber
    epochs: Count
    seed: Seed


@params_class
class SpiralParams:
    classes: Annotated[Integer, Field(ge=2, description="an integer >= 2")]
    points_per_class: Annotated[Integer, Field(ge=2, description="an integer >= 2")]
    noise: NonNegativeNumber
    test_fraction: Annotated[Number, Field(gt=0, lt=1, description="a number > 0 and < 1")]
    activations: Annotated[tuple[Activation, ...], Field(min_length=1), AfterValidator(_distinct),
                           Field(description="a non-empty list without repeats")]
    hidden: Count
    lr: PositiveNumber
    steps: Count
    seed: Seed


@params_class
class Params:
    data: DataParams
    prepare: PrepareParams
    mlflow: MlflowParams
    train: TrainParams
    variants: Annotated[dict[VariantName, TrainParams], Field(min_length=1, description="at least one variant")]
    evaluate: EvaluateParams
    # Optional: a params file for another pipeline (lessons/mnist/params.yaml) leaves the lessons out.
    linreg: LinregParams | None = None
    spiral: SpiralParams | None = None

    def section(self, name: str) -> Any:
        """An optional section that a stage needs."""
        if getattr(self, name) is None:
            raise ParamsError(f"{name}: missing key")
        return getattr(self, name)

    def variant(self, name: str) -> TrainParams:
        """The train defaults with the variant's overrides."""
        if name not in self.variants:
            raise ParamsError(f"variants.{name}: no such variant; expected one of {sorted(self.variants)}")
        return self.variants[name]


def stage_parser(doc: str) -> argparse.ArgumentParser:
    """A stage's command line: the first line of its docstring, and where params.yaml is."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    return parser


def load(path: Path = DEFAULT_PARAMS) -> Params:
    """Read and check params.yaml; raise ParamsError naming the first bad key."""
    params = validate(Params, _with_variant_defaults(read_yaml(path)), source=str(path))
    _check_data(params.data)
    spec = params.data.spec()
    _check_validation(params.prepare, spec)
    _check_memory("train", params.train, spec.classes)
    for name, variant in params.variants.items():
        _check_memory(f"variants.{name}", variant, spec.classes)
    return params


def load_section(path: Path, name: str, model: type[Model]) -> Model:
    """One section of a params file checked by `model` (a pydantic dataclass), e.g. a lesson's own params."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or name not in raw:
        raise ParamsError(f"{name}: missing key")
    return validate(model, raw[name], source=str(path), prefix=(name,))


def read_yaml(path: Path) -> Any:
    """The YAML at `path`, read with _ParamsLoader; an unreadable file is a ParamsError."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_ParamsLoader)
    except (OSError, yaml.YAMLError) as error:
        raise ParamsError(f"{path}: cannot read: {' '.join(str(error).split())}") from None


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, and a key given twice is an error (PyYAML keeps the last one silently)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, "", set())
        return super().construct_document(node)


# YAML 1.2 reads 1e-3 as a number; PyYAML (YAML 1.1) reads it as a string unless it has a dot and a signed exponent.
_ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                    list("-+.0123456789"))


def _check_unique_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    """Raise ParamsError for the first mapping key given twice, naming its path and both lines."""
    if id(node) in seen:  # an alias: checked where its anchor is (and it may refer to itself)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{index}]", seen)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        key_path = f"{path}.{key}" if path else key
        if key in lines:
            raise ParamsError(f"{key_path}: got a second {key!r} at line {line} (the first is at line {lines[key]}), "
                              "expected each key once")
        lines[key] = line
        _check_unique_keys(value_node, key_path, seen)


def _with_variant_defaults(raw: Any) -> Any:
    """Each variant is the train section with the variant's overrides (checked like train itself)."""
    if not (isinstance(raw, dict) and isinstance(raw.get("train"), dict) and isinstance(raw.get("variants"), dict)):
        return raw  # pydantic names what is wrong
    variants = {}
    for name, overrides in raw["variants"].items():
        # `d2l:` with nothing under it is the train section as it is; a non-mapping is left for pydantic to name.
        is_mapping = isinstance(overrides, dict) or overrides is None
        variants[name] = {**raw["train"], **(overrides or {})} if is_mapping else overrides
    return {**raw, "variants": variants}


@functools.cache
def _adapter(model: Any) -> TypeAdapter:
    return TypeAdapter(model)


def validate(model: type[Model], raw: Any, source: str, prefix: tuple[str, ...] = ()) -> Model:
    """`raw` (from file `source`, at key path `prefix`) checked by pydantic; the first error becomes one line."""
    try:
        return _adapter(model).validate_python(raw)
    except ValidationError as error:
        raise ParamsError(_message(error.errors()[0], model, source, prefix)) from None


def _message(error: dict, model: Any, source: str, prefix: tuple[str, ...]) -> str:
    """`<key path>: got <value>, expected <what>` (or `missing key`, `unknown key`) for one pydantic error."""
    loc = error["loc"]  # the value's repr is shortened: a 400-digit int or a long list is no help on one line
    path = _key_path((*prefix, *loc)) or source
    if error["type"] in ("missing", "missing_argument", "missing_keyword_argument"):
        return f"{path}: missing key"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        fields = [field.name for field in dataclasses.fields(_bare(_annotation_at(model, loc[:-1])))]
        return f"{path}: unknown key, expected one of {fields}"
    return f"{path}: got {reprlib.repr(error['input'])}, expected {_expected(error, _annotation_at(model, loc))}"


def _key_path(loc: tuple) -> str:
    """('variants', 'd2l', 'hidden', 1) -> 'variants.d2l.hidden[1]'."""
    path = ""
    for part, after in zip(loc, (*loc[1:], None)):
        if isinstance(part, int) and after != "[key]":  # an item's index, not a mapping's key that YAML read as int
            path += f"[{part}]"
        elif part != "[key]":  # pydantic's marker for an error in a mapping's key rather than its value
            path += f".{part}" if path else str(part)
    return path


def _annotation_at(model: Any, loc: tuple) -> Any:
    """The annotated type that checked the value at `loc`, to find the words for what it expects."""
    annotation = model
    for position, part in enumerate(loc):
        base = _bare(annotation)
        if dataclasses.is_dataclass(base):
            annotation = typing.get_type_hints(base, include_extras=True).get(part, Any)
        elif typing.get_origin(base) is dict:
            key_type, value_type = typing.get_args(base)
            annotation = key_type if loc[position + 1: position + 2] == ("[key]",) else value_type
        elif typing.get_origin(base) is tuple:
            annotation = typing.get_args(base)[0]
    return annotation


def _bare(annotation: Any) -> Any:
    """The type under Annotated[...] and `| None`."""
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif type(None) in typing.get_args(annotation):
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        else:
            return annotation


def _expected(error: dict, annotation: Any) -> str:
    """Our words for what a value must be: the field's description, or its type's."""
    too_large = error["type"] == "float_type" and type(error["input"]) is int  # an int beyond float's range
    if error["type"] == "finite_number" or too_large:
        return "a finite number"
    if error["type"] == "less_than" and error["ctx"]["lt"] == INT64_END:
        return "an integer < 2**63 (int64)"
    descriptions = [item.description for item in typing.get_args(annotation)[1:]
                    if isinstance(item, FieldInfo) and item.description]
    if descriptions:
        return descriptions[-1]
    base = _bare(annotation)
    if typing.get_origin(base) is Literal:
        return f"one of {list(typing.get_args(base))}"
    if typing.get_origin(base) is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}.get(
        base, "a mapping of keys to values")


def _check_data(data: DataParams) -> None:
    """A built-in dataset has its hashes and sizes in code; another one must pin all four files."""
    if data.dataset in datasets.BUILT_IN:
        for key, what in (("sha256", "hashes"), ("counts", "counts")):
            if getattr(data, key):
                raise ParamsError(f"data.{key}: {data.dataset} has {what} pinned in code; expected no data.{key}")
    elif set(data.sha256) != set(datasets.FILE_KINDS):
        raise ParamsError(f"data.dataset: got {data.dataset!r}, expected one of {sorted(datasets.BUILT_IN)} "
                          f"or data.sha256 pinning all of {list(datasets.FILE_KINDS)}")


def _check_validation(prepare: PrepareParams, spec: datasets.DatasetSpec) -> None:
    """The held-out images must leave a train split and give every class at least one image."""
    held_out, train_count = prepare.validation, (spec.counts or {}).get("train")
    if 0 < held_out < spec.classes:
        raise ParamsError(f"prepare.validation: got {held_out}, expected 0 or at least {spec.classes} "
                          "(one image per class)")
    if train_count is not None and held_out >= train_count:  # without counts, prepare checks it on the data
        raise ParamsError(f"prepare.validation: got {held_out}, expected fewer than the {train_count} train images "
                          f"of {spec.name}")


# Optimizer state per parameter, in parameter-sized tensors (torch.optim without momentum).
OPTIMIZER_STATE = {"sgd": 0, "adam": 2, "adagrad": 1, "rmsprop": 1}
FLOAT_BYTES = 4


def training_bytes(train: TrainParams, inputs: int, classes: int) -> tuple[int, int]:
    """Float32 bytes a training needs, from the sizes alone: (parameters + gradients + optimizer state,
    one batch's activations: its inputs, each layer's output before and after the activation)."""
    widths = [inputs, *train.hidden, classes]
    parameters = sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(widths))
    weights = parameters * (2 + OPTIMIZER_STATE[train.optimizer]) * FLOAT_BYTES
    batch = train.batch_size * (inputs + 2 * sum(widths[1:])) * FLOAT_BYTES
    return weights, batch


def physical_memory_bytes() -> int | None:
    """This machine's RAM, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(key: str, train: TrainParams, classes: int) -> None:
    """Refuse a model whose training cannot fit in RAM, before torch tries to allocate it."""
    weights, batch = training_bytes(train, datasets.IMAGE_PIXELS, classes)
    available = physical_memory_bytes()
    if available is None or weights + batch <= available:
        return
    culprit, value = ("hidden", list(train.hidden)) if weights >= batch else ("batch_size", train.batch_size)
    raise ParamsError(f"{key}.{culprit}: got {value}, expected a model that fits in memory: training needs about "
                      f"{(weights + batch) / 1e9:.1f} GB (parameters, gradients, optimizer state, one batch), "
                      f"this machine has {available / 1e9:.1f} GB")
