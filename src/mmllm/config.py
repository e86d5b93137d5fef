"""One config system: typed dataclasses, YAML recipes, dotted overrides, and `--help` from field docstrings.

A field documents itself with a string literal right below it (as litgpt does); that text is the
option's help. Nested dataclass fields become sections (`train.lr=3e-4` on the command line).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mmllm.errors import MmllmError

T = TypeVar("T")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` (and its bases) to the docstring written below it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, with an error that names the field."""
    tp, optional = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, f"{name}.")
    if value is None:
        if optional:
            return None
        raise MmllmError(f"{name}: a value is required")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise MmllmError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        items = value if isinstance(value, list | tuple) else [v for v in str(value).split(",") if v]
        return origin(coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(items))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise MmllmError(f"{name}: {value!r} is not a boolean")
    if tp in (int, float, str):
        try:
            result = tp(value)
        except (TypeError, ValueError):
            raise MmllmError(f"{name}: {value!r} is not a valid {tp.__name__}") from None
        if tp is int and isinstance(value, float) and value != result:
            raise MmllmError(f"{name}: {value!r} is not an integer")
        return result
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from nested dicts; unknown keys are an error, not silently ignored."""
    if not isinstance(data, dict):
        raise MmllmError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    types_ = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MmllmError(
            f"unknown config keys {', '.join(prefix + k for k in unknown)}; known: {sorted(known)}"
        )
    return cls(**{key: coerce(value, types_[key], prefix + key) for key, value in data.items()})


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to nested dicts; values are parsed as YAML scalars.

    A number indexes a list: `datasets.0.split=test` sets the first dataset's split.
    """
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise MmllmError(f"override {override!r} is not of the form key.path=value")
        node: Any = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = _child(node, part, override)
        value = yaml.safe_load(raw) if raw else ""
        if isinstance(node, list):
            node[_index(node, leaf, override)] = value
        else:
            node[leaf] = value
    return data


def _index(items: list, part: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise MmllmError(f"override {override!r}: {part!r} is not an index of a list of {len(items)}")
    return int(part)


def _child(node: Any, part: str, override: str) -> Any:
    child = node[_index(node, part, override)] if isinstance(node, list) else node.setdefault(part, {})
    if not isinstance(child, dict | list):
        raise MmllmError(f"override {override!r}: {part} is not a section")
    return child


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] = (),
    base: dict[str, Any] | None = None,
) -> T:
    """Dataclass defaults <- `base` or a YAML recipe <- dotted overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise MmllmError(f"{path}: no such config file") from None
        except yaml.YAMLError as err:
            raise MmllmError(f"{path}: invalid YAML ({err})") from None
    return from_dict(cls, apply_overrides(data, list(overrides)))


def add_arguments(parser: argparse.ArgumentParser, cls: type, dest_prefix: str = "") -> None:
    """Add one `--field-name` option per (non-nested) field of `cls`, typed, with its docstring as help."""
    docs = field_docs(cls)
    for field, tp in _field_types(cls).items():
        default = next(f for f in dataclasses.fields(cls) if f.name == field).default
        tp, _ = _strip_optional(tp)
        option = "--" + field.replace("_", "-")
        kwargs: dict[str, Any] = {
            "dest": dest_prefix + field,
            "default": default,
            "help": docs.get(field, ""),
        }
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
        else:
            kwargs["type"] = functools.partial(_parse_option, tp=tp, name=option)
            kwargs["metavar"] = getattr(tp, "__name__", "VALUE").upper()
        if default is not None and default is not dataclasses.MISSING and not isinstance(default, bool):
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(option, **kwargs)


def describe_fields(cls: type, prefix: str = "") -> list[str]:
    """One line per field of `cls`, nested sections spelled out (`optim.lr_projector`), with its
    default and docstring: a recipe's reference, e.g. for `mmllm train --help`."""
    docs, lines = field_docs(cls), []
    for field in dataclasses.fields(cls):
        tp, _ = _strip_optional(_field_types(cls)[field.name])
        if dataclasses.is_dataclass(tp):
            lines += describe_fields(tp, f"{prefix}{field.name}.")
            continue
        default = (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        )
        default = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        lines.append(f"  {prefix}{field.name} ({default})  {docs.get(field.name, '')}".rstrip())
        item = (typing.get_args(tp) or (None,))[0]
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(item):  # e.g. data.datasets.N.split
            lines += describe_fields(item, f"{prefix}{field.name}.N.")
    return lines


def _parse_option(raw: str, tp: Any, name: str) -> Any:
    try:
        return coerce(raw, tp, name)
    except MmllmError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def from_namespace(cls: type[T], namespace: argparse.Namespace, dest_prefix: str = "") -> T:
    return cls(**{f.name: getattr(namespace, dest_prefix + f.name) for f in dataclasses.fields(cls)})
