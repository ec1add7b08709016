"""The pipeline's params.yaml as frozen typed params: every key and value checked before any work.

A bad key or value stops a stage with one line naming it: `<key path>: got <value>, expected <what>`
(params_file.py reads and checks; here are the pipeline's sections and the checks across them: dataset
sizes, the validation split, memory). Lessons own their params files and types.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from pipeline import datasets
from pipeline.executor import ExecutorParams
from pipeline.params_file import (
    Activation,
    Count,
    Flag,
    Fraction,
    Integer,
    NonNegativeInteger,
    Number,
    ParamsError,
    PositiveNumber,
    Seed,
    Seeds,
    Text,
    VariantName,
    distinct,
    load_section,
    params_class,
    read_yaml,
    validate,
)

DEFAULT_PARAMS = Path("params.yaml")
__all__ = ["ParamsError", "load", "load_section", "Params", "TrainParams"]


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
    # the matrix multiplies' precision (bf16: fp32 weights, update and loss kept), the same on every machine
    precision: Literal["fp32", "bf16"]


@params_class
class EvaluateParams:
    max_train_loss: PositiveNumber
    min_train_accuracy: Fraction
    min_test_accuracy: Fraction


@params_class
class CompareParams:
    margin: Annotated[Number, Field(gt=0, lt=1, description="a number between 0 and 1 (exclusive)")]
    alpha: Annotated[Number, Field(gt=0, lt=0.5, description="a number between 0 and 0.5 (exclusive)")]
    prefer: Literal["fewest_changes", "first_listed"]
    bootstrap: Annotated[Integer, Field(ge=100, description="an integer >= 100")]


@params_class(kw_only=True)
class SweepParams:
    """Where a grid's chunks of models run (pipeline/executor.py): the keys every sweep's section shares."""

    executor: Literal["local", "ray"] = "local"
    ray_address: Text = "auto"  # auto (RAY_ADDRESS, or the cluster `ray start` made here) or host:port
    num_cpus: PositiveNumber = 1.0  # per Ray task; torch in the task gets as many threads
    max_retries: NonNegativeInteger = 3  # a task is retried when its worker or node dies

    def executor_settings(self) -> ExecutorParams:
        return ExecutorParams(self.executor, self.ray_address, self.num_cpus, self.max_retries)


@params_class
class InitScaleParams(SweepParams):
    experiment: Text
    stds: Annotated[tuple[PositiveNumber, ...], Field(min_length=1), AfterValidator(distinct)]
    mixed: tuple[tuple[PositiveNumber, PositiveNumber], ...]
    pytorch_default: Flag
    seeds: Seeds
    epochs: Count
    report_epochs: Annotated[tuple[Count, ...], Field(min_length=1), AfterValidator(distinct)]
    probe: Count
    precision: Literal["fp32", "bf16"] = "fp32"
    trace_every: Count = 10  # epoch 1's trace: a record every this many steps
    sharpness_epochs: tuple[NonNegativeInteger, ...] = (0, 1, 10)  # top Hessian eigenvalue at these epochs
    sharpness_iterations: Count = 20  # power-iteration steps
    chunk_models: Count = 27  # models trained together in one executor task: the grid's (point, seed) pairs in order


InputScalings = Annotated[
    tuple[Literal["standardized", "pixels"], ...], Field(min_length=1), AfterValidator(distinct)
]  # standardized: train mean and std; pixels: d2l's own [0, 1]


@params_class
class PhaseDiagramParams(SweepParams):
    experiment: Text
    lrs: Annotated[tuple[PositiveNumber, ...], Field(min_length=1), AfterValidator(distinct)]
    seeds: Seeds
    epochs: Count
    inputs: InputScalings
    precision: Literal["fp32", "bf16"] = "fp32"


@params_class
class InterventionsParams(SweepParams):
    experiment: Text
    points: Annotated[tuple[tuple[PositiveNumber, PositiveNumber], ...], Field(min_length=1)]  # (W1 std, W2 std)
    seeds: Seeds
    epochs: Count
    inputs: InputScalings
    temperature: PositiveNumber  # the logit scale c^2 of the homogeneity identity
    weight_decay: Annotated[tuple[PositiveNumber, ...], AfterValidator(distinct)]
    adam_lr: PositiveNumber
    precision: Literal["fp32", "bf16"] = "fp32"


@params_class
class TrainCh3Params:
    experiment: Text
    points: Annotated[tuple[tuple[PositiveNumber, PositiveNumber], ...], Field(min_length=1)]  # (W1 std, W2 std)
    seeds: Seeds
    epochs: Count
    lr: PositiveNumber
    batch_size: Count


@params_class
class Params:
    data: DataParams
    prepare: PrepareParams
    mlflow: MlflowParams
    train: TrainParams
    variants: Annotated[dict[VariantName, TrainParams], Field(min_length=1, description="at least one variant")]
    evaluate: EvaluateParams
    compare: CompareParams
    init_scale: InitScaleParams | None = None  # the pipeline's study; a lesson reusing the stages has none
    phase_diagram: PhaseDiagramParams | None = None  # learning rate x init point, on both input scalings
    interventions: InterventionsParams | None = None  # temperature, weight decay and Adam at chosen inits
    train_ch3: TrainCh3Params | None = None  # d2l's own code at chosen inits, on its own inputs

    def variant(self, name: str) -> TrainParams:
        """The train defaults with the variant's overrides."""
        if name not in self.variants:
            raise ParamsError(f"variants.{name}: no such variant; expected one of {sorted(self.variants)}")
        return self.variants[name]


def load(path: Path = DEFAULT_PARAMS) -> Params:
    """Read and check params.yaml; raise ParamsError naming the first bad key."""
    params = validate(Params, _with_variant_defaults(read_yaml(path)), source=str(path))
    _check_data(params.data)
    spec = params.data.spec()
    _check_validation(params.prepare, spec)
    _check_memory("train", params.train, spec.classes)
    if params.init_scale is not None:
        _check_init_scale(params.init_scale, params.train)
    for name, variant in params.variants.items():
        _check_memory(f"variants.{name}", variant, spec.classes)
    return params


def _check_init_scale(study: InitScaleParams, train: TrainParams) -> None:
    """The study reports epochs it trains, and names W1 and W2: one hidden layer."""
    late = [epoch for epoch in study.report_epochs if epoch > study.epochs]
    if late:
        raise ParamsError(
            f"init_scale.report_epochs: got {late}, expected epochs <= init_scale.epochs ({study.epochs})"
        )
    if len(train.hidden) != 1:
        raise ParamsError(
            f"train.hidden: got {list(train.hidden)}, expected one hidden layer for init_scale (it varies W1 and W2)"
        )


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


def _check_data(data: DataParams) -> None:
    """A built-in dataset has its hashes and sizes in code; another one must pin all four files."""
    if data.dataset in datasets.BUILT_IN:
        for key, what in (("sha256", "hashes"), ("counts", "counts")):
            if getattr(data, key):
                raise ParamsError(f"data.{key}: {data.dataset} has {what} pinned in code; expected no data.{key}")
    elif set(data.sha256) != set(datasets.FILE_KINDS):
        raise ParamsError(
            f"data.dataset: got {data.dataset!r}, expected one of {sorted(datasets.BUILT_IN)} "
            f"or data.sha256 pinning all of {list(datasets.FILE_KINDS)}"
        )


def _check_validation(prepare: PrepareParams, spec: datasets.DatasetSpec) -> None:
    """The held-out images must leave a train split and give every class at least one image."""
    held_out, train_count = prepare.validation, (spec.counts or {}).get("train")
    if 0 < held_out < spec.classes:
        raise ParamsError(
            f"prepare.validation: got {held_out}, expected 0 or at least {spec.classes} (one image per class)"
        )
    if train_count is not None and held_out >= train_count:  # without counts, prepare checks it on the data
        raise ParamsError(
            f"prepare.validation: got {held_out}, expected fewer than the {train_count} train images of {spec.name}"
        )


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
    raise ParamsError(
        f"{key}.{culprit}: got {value}, expected a model that fits in memory: training needs about "
        f"{(weights + batch) / 1e9:.1f} GB (parameters, gradients, optimizer state, one batch), "
        f"this machine has {available / 1e9:.1f} GB"
    )
