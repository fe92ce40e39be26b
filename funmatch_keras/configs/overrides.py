"""Command-line overrides of a config (`--config.FIELD=VALUE`), typed by its fields.

Example:
>>> from funmatch_keras.configs import load_config
>>> apply_overrides(load_config("digits"), {"epochs": "3", "flip": "true"}).epochs
3
"""

from __future__ import annotations

import ast
import copy
import difflib
from typing import Any, Mapping

import ml_collections

from funmatch_keras.configs.common import FIELDS, NoneType, parse_bool


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_flat_keys(value, f"{prefix}{key}."))
    return keys


def _unknown_field_error(config: ml_collections.ConfigDict, key: str) -> ValueError:
    valid = _flat_keys(config)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"Unknown config field {key!r} (from --config.{key}).{hint} "
        f"Valid fields: {', '.join(sorted(valid))}."
    )


def _literal(text: str) -> Any:
    """Python literal of `text`, or `text` itself when it is not one (a plain string)."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text


def _to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # accepts "1e6" for epochs; rejects "3.5" below
        if not value.is_integer():
            raise
        return int(value)


def _to_list(text: str) -> list:
    value = _literal(text)
    if isinstance(value, (list, tuple)):
        return list(value)
    return [_literal(item) for item in text.split(",")]


def type_names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is NoneType else t.__name__ for t in types)


def _convert(key: str, current: Any, text: str, field: Any) -> Any:
    """Converts the command-line string `text` for the field `key` holding `current`."""
    nullable = current is None or (field is not None and field.nullable)
    if nullable and text.strip().lower() in ("none", "null"):
        return None
    allows_list = field is not None and list in field.types
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(
            f"Config field {key!r} is a group of fields ({', '.join(current)}); "
            f"override one of them, e.g. --config.{key}.{next(iter(current), 'x')}=..."
        )
    if current is None or (allows_list and text.strip().startswith("[")):
        value = _literal(text)
        if field is not None and not has_type(value, field.types) and str in field.types:
            value = text  # e.g. a data_dir named "2024" stays a path
    else:
        expected = type(current)
        converters = {bool: parse_bool, int: _to_int, float: float, str: str,
                      list: _to_list, tuple: lambda t: tuple(_to_list(t))}
        try:
            value = converters[expected](text) if expected in converters else None
        except ValueError:
            value = None
        if value is None:
            literal = _literal(text)
            if not isinstance(literal, expected) or (
                expected is int and isinstance(literal, bool)
            ):
                allowed = field.types if field is not None else (expected,)
                raise ValueError(
                    f"Config field {key!r} expects {type_names(allowed)}. Received: {text!r}"
                )
            value = literal
    if field is not None and not has_type(value, field.types):
        raise ValueError(
            f"Config field {key!r} expects {type_names(field.types)}. Received: {text!r}"
        )
    return value


def has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, str]
) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with command-line overrides applied.

    Each string is converted to the type the field holds: int, float, bool
    (`true`/`false`), str; `None`/`none` clears a field that may be None; a field
    holding None takes a Python literal (`5`, `0.1`, `[224, 384]`) or else the
    string itself. A field that may hold a list (`teacher`, `teacher_size`,
    `teacher_weights`) takes a list literal. Nested fields use dots (`a.b`).

    Args:
        config: `ml_collections.ConfigDict`. Left unchanged.
        overrides: mapping from field name to its string value, e.g.
            `{"epochs": "10"}` from `--config.epochs=10`.

    Returns:
        A new `ConfigDict`.

    Raises:
        ValueError: an unknown field (with close matches and the valid fields),
            or a value that does not convert to the field's type.

    Example:
    >>> from funmatch_keras.configs import load_config
    >>> config = load_config("digits")
    >>> apply_overrides(config, {"epochs": "3", "flip": "true"}).epochs
    3
    """
    config = copy.deepcopy(config)
    for key, text in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise _unknown_field_error(config, ".".join(parents[: depth + 1] + [leaf]))
            node = child
        if leaf not in node:
            raise _unknown_field_error(config, key)
        field = FIELDS.get(key) if not parents else None
        value = _convert(key, node[leaf], str(text), field)
        try:
            setattr(node, leaf, value)
        except TypeError:
            # ConfigDict keeps a field's first type; a declared union (e.g. a
            # single teacher becoming an ensemble list) replaces the field.
            with node.unlocked():
                del node[leaf]
                node[leaf] = value
    return config
