"""`--set key=value` options: text → the typed fields of a method's Config or of TrainOptions.

Keys name a field of the method's config dataclass (`--set embed_dim=256`), or, with a `train.` prefix,
a field of the engine's TrainOptions (`--set train.accum_steps=2`). Values are read by the field's type:
int, float, str, bool (true/false/1/0/yes/no), optional fields also take `none`, tuples and lists take
comma-separated items, dicts take JSON.

A TOML options file (`ped train --config FILE`) holds the same keys: method options at the top level,
engine options under `[train]`, plus the run's `method`, `seed` and `cache`. Its values are rendered as
`KEY=VALUE` text and read by the same parser, so a file and `--set` accept, convert and refuse alike;
`options_toml` writes a run's resolved options back as such a file (`ped runs show RUN --config-out`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from pedcli.errors import PedError

TRAIN_PREFIX = "train."
RUN_KEYS = ("method", "seed", "cache")  # top-level keys of an options file that are not method options
NONE = "none"  # TOML has no null: an unset optional option is written as this string
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


def parse_assignments(
    items: Sequence[str], method_config: type, train_options: type, source: str = "--set"
) -> tuple[dict, dict]:
    """(method overrides, train overrides) from `key=value` strings, typed; unknown keys are an error.
    `source` names where the items came from in error messages (`--set`, or an options file)."""
    targets = {"method": field_types(method_config), "train": field_types(train_options)}
    out: dict[str, dict[str, Any]] = {"method": {}, "train": {}}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PedError(f"{source} {item!r} is not KEY=VALUE", "e.g. --set embed_dim=256")
        section = "train" if key.startswith(TRAIN_PREFIX) else "method"
        name = key.removeprefix(TRAIN_PREFIX)
        types_ = targets[section]
        if name not in types_:
            prefix = TRAIN_PREFIX if section == "train" else ""
            valid = ", ".join(prefix + n for n in sorted(types_))
            raise PedError(f"{source} {key}: no such {section} option", f"valid: {valid}")
        try:
            out[section][name] = _convert(text.strip(), types_[name], key)
        except (ValueError, json.JSONDecodeError) as e:
            wanted = type_name(types_[name])
            raise PedError(
                f"{source} {key}={text!r} is not a valid {wanted} ({e})", "check the value"
            ) from None
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


@dataclass
class OptionsFile:
    """What an options file sets: the run keys, and every option as `KEY=VALUE` for `parse_assignments`."""

    source: str = "--config"
    method: str | None = None
    seed: int | None = None
    cache: Path | None = None
    items: list[str] = field(default_factory=list)


def _text(value: Any) -> str:
    """A TOML value as `--set` text: booleans true/false, arrays comma-separated, tables JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def read_options_file(path: Path | None) -> OptionsFile:
    """The options of a TOML file (nothing when `path` is None); a file that is not TOML is refused."""
    if path is None:
        return OptionsFile()
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PedError(f"options file {path} not found", "check the --config path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PedError(f"{path} is not a valid TOML file ({e})", "fix the line it names") from None
    train = data.pop("train", {})
    if not isinstance(train, dict):
        raise PedError(f"{path}: `train` must be a table of engine options", "write them under [train]")
    out = OptionsFile(source=str(path), method=data.pop("method", None))
    seed, cache = data.pop("seed", None), data.pop("cache", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise PedError(f"{path}: seed = {seed!r} is not an integer", "e.g. seed = 0")
    out.seed, out.cache = seed, Path(cache) if cache is not None else None
    out.items = [f"{k}={_text(v)}" for k, v in data.items()]
    out.items += [f"{TRAIN_PREFIX}{k}={_text(v)}" for k, v in train.items()]
    return out


def _toml_value(value: Any) -> Any:
    if value is None:
        return NONE
    if isinstance(value, dict):
        return {k: _toml_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_toml_value(v) for v in value]
    return value


def options_toml(config: dict[str, Any]) -> str:
    """A run's resolved options (its config.json) as an options file that `read_options_file` reads back."""
    head = {"method": config["method"], "seed": config["seed"], "cache": config["cache"]}
    doc = head | _toml_value(config["method_config"]) | {"train": _toml_value(config["train"])}
    return f"# ped train --config FILE; --set KEY=VALUE and flags override these\n{tomli_w.dumps(doc)}"
