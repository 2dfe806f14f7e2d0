"""Configs from dicts, YAML files and ``key=value`` overrides, checked field by field (shared by every config).

:func:`build` is the one way a config is made from user data: it names unknown fields and wrong types by their
full key, and turns the key a section's own checks use (``eval.every``) into the full one
(``stages.stage2.eval.every``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from owl2.config.core import ConfigError

T = TypeVar("T")


def build(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Construct dataclass ``cls`` from a nested dict, checking names and types field by field.

    ``where`` is the section's full key (``stages.stage2.eval``); the class's own checks name its fields by the
    section's last key (``eval.every``) or, for a config found under a name the user picks, by the class's
    ``section`` (``stage.max_steps``), and the error they raise comes back starting with the full key.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field(s) {[_join(where, k) for k in unknown]}; valid: {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise _qualified(error, getattr(cls, "section", where.rpartition(".")[2]), where) from None


def _qualified(error: ConfigError, section: str, where: str) -> ConfigError:
    """``error`` with the section's own key at its start (``eval.every``) made full (``stages.stage2.eval.every``)."""
    message = str(error)
    if not where or section == where or not message.startswith(f"{section}."):
        return error
    return ConfigError(where + message[len(section) :])


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        value_type = (typing.get_args(hint) or (Any, Any))[1]
        return {key: _coerce(value_type, item, f"{where}.{key}") for key, item in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML reads "3e-3" (no dot) as a string, YAML 1.1's rule; users mean the number.
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (the inverse of :func:`build`)."""
    return dataclasses.asdict(config)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["decoder.num_layers=4", "vision.image_size=224"]`` -> nested dict with YAML-typed values."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        node = result
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a field below {part!r}, which is a value")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is {_yaml_problem(error)}") from None
    return result


def merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. A list in ``base`` takes updates by index (``sources.0.path``
    from an override), so an override can reach one item without restating the list."""
    merged = dict(base)
    for key, value in update.items():
        current, full = merged.get(key), _join(where, str(key))
        if isinstance(value, dict) and isinstance(current, dict):
            merged[key] = merge(current, value, full)
        elif isinstance(value, dict) and isinstance(current, list) and value and all(_is_index(k) for k in value):
            merged[key] = _merge_items(current, value, full)
        else:
            merged[key] = value
    return merged


def _is_index(key: Any) -> bool:
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def _merge_items(items: list[Any], update: dict[Any, Any], where: str) -> list[Any]:
    merged = list(items)
    for key, value in update.items():
        index = int(key)
        if index >= len(merged):
            raise ConfigError(f"{where}.{index}: {where} has {len(merged)} item(s), indices 0-{len(merged) - 1}")
        item = merged[index]
        both_mappings = isinstance(value, dict) and isinstance(item, dict)
        merged[index] = merge(item, value, f"{where}.{index}") if both_mappings else value
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file or a syntax error is a one-line :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: {_yaml_problem(error)}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``invalid YAML at line 3, column 12: expected ',' or '}', but got '<stream end>'`` (lines counted from 1)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
