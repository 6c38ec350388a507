"""`--set key=value` options: text → the typed fields of a method's Config or of TrainOptions.

Keys name a field of the method's config dataclass (`--set embed_dim=256`), or, with a `train.` prefix,
a field of the engine's TrainOptions (`--set train.accum_steps=2`). Values are read by the field's type:
int, float, str, bool (true/false/1/0/yes/no), optional fields also take `none`, tuples and lists take
comma-separated items, dicts take JSON.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

from pedcli.errors import PedError

TRAIN_PREFIX = "train."
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of every dataclass field (the annotations are strings under PEP 563)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _convert(text: str, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(text, inner[0], key)
    if origin in (tuple, list):
        item = args[0] if args else str
        values = [_convert(v.strip(), item, key) for v in text.split(",") if v.strip()]
        return tuple(values) if origin is tuple else values
    if origin is dict or tp is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if tp in (int, float, str):
        return tp(text)
    raise ValueError(f"options of type {tp} cannot be set from the command line")


def parse_assignments(items: Sequence[str], method_config: type, train_options: type) -> tuple[dict, dict]:
    """(method overrides, train overrides) from `key=value` strings, typed; unknown keys are an error."""
    targets = {"method": field_types(method_config), "train": field_types(train_options)}
    out: dict[str, dict[str, Any]] = {"method": {}, "train": {}}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PedError(f"--set {item!r} is not KEY=VALUE", "e.g. --set embed_dim=256")
        section = "train" if key.startswith(TRAIN_PREFIX) else "method"
        name = key.removeprefix(TRAIN_PREFIX)
        types_ = targets[section]
        if name not in types_:
            prefix = TRAIN_PREFIX if section == "train" else ""
            valid = ", ".join(prefix + n for n in sorted(types_))
            raise PedError(f"--set {key}: no such {section} option", f"valid: {valid}")
        try:
            out[section][name] = _convert(text.strip(), types_[name], key)
        except (ValueError, json.JSONDecodeError) as e:
            wanted = type_name(types_[name])
            raise PedError(f"--set {key}={text!r} is not a valid {wanted} ({e})", "check the value") from None
    return out["method"], out["train"]


def describe_options(cls: type) -> list[tuple[str, str, str]]:
    """(name, type, default) of every field, for `ped methods`."""
    rows = []
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((f.name, type_name(types_[f.name]), repr(default)))
    return rows
