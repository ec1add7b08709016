"""Reading a params file: YAML that refuses a key given twice, pydantic checks, and one-line messages.

Shared by the pipeline's params (config.py) and each lesson's own params file. Pydantic checks types, ranges and
unknown or missing keys; the code here does what it cannot: keys given twice (PyYAML silently keeps the last)
and turning pydantic's first error into `<key path>: got <value>, expected <what>`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import reprlib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from pipeline.errors import PipelineError

INT64_END = 2**63
Model = TypeVar("Model")


class ParamsError(PipelineError):
    """A bad key or value in params.yaml."""


def distinct(values: tuple) -> tuple:
    """A validator: the items of a list must not repeat."""
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
Seeds = Annotated[
    tuple[Seed, ...],
    Field(min_length=1),
    AfterValidator(distinct),
    Field(description="a non-empty list of distinct integers >= 0 and < 2**63"),
]
# DVC writes train@<name> and a shell passes --variant <name>: no spaces, '@', '/', ':' or '.'.
VariantName = Annotated[
    str,
    Strict(),
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="a name of letters, digits, '_' or '-' that starts with a letter or digit",
    ),
]
Activation = Literal["relu", "sigmoid", "tanh", "leaky_relu"]

params_class = functools.partial(dataclass, frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))


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
_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+.0123456789")
)


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
            raise ParamsError(
                f"{key_path}: got a second {key!r} at line {line} (the first is at line {lines[key]}), "
                "expected each key once"
            )
        lines[key] = line
        _check_unique_keys(value_node, key_path, seen)


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
            annotation = key_type if loc[position + 1 : position + 2] == ("[key]",) else value_type
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
    descriptions = [
        item.description for item in typing.get_args(annotation)[1:] if isinstance(item, FieldInfo) and item.description
    ]
    if descriptions:
        return descriptions[-1]
    base = _bare(annotation)
    if typing.get_origin(base) is Literal:
        return f"one of {list(typing.get_args(base))}"
    if typing.get_origin(base) is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}.get(
        base, "a mapping of keys to values"
    )
