"""One config mechanism for every stage: typed dataclasses <- a TOML file <- `--key=value` overrides.

    @dataclass
    class TrainConfig:
        steps: int = 1000          # optimiser steps
        model: ModelConfig = field(default_factory=ModelConfig)

    cfg = parse_config(TrainConfig, ["--config", "run.toml", "--steps=50", "--model.size=tiny"])

Nested dataclasses are addressed by dotted keys on the command line and by tables in TOML. A partial table for a
nested dataclass keeps that section's other defaults; a value for a dict-typed field (e.g. `losses.weights`) replaces
the default dict whole, from every source (TOML table, JSON string, dotted keys), so an ablation's weights are exactly
the ones written. An unknown key or a value of the wrong type raises `ConfigError` naming the key and listing the valid
ones: a typo must never be a silent no-op. `to_dict`/`from_dict` give the JSON form that travels inside checkpoints
and manifests. Config files and values are parsed as data (tomllib, json), never executed.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from data.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config key or value that does not fit the dataclass."""


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Coerce `value` (from TOML, JSON or a command-line string) to type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: {value!r} is not a JSON list ({e}); write a,b or [a, b]") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, key) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_convert(v, item, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: expected a table/dict (JSON on the command line), got {value!r}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table/dict, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def required() -> Any:
    """A setting with no default (an input or output path the user must name): building the config without it
    raises a ConfigError naming the key. `--help` shows it as <required>."""
    return dataclasses.field(default="", metadata={"required": True})


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build `cls` from a (possibly nested) dict; unknown keys, wrong types and missing required settings raise
    ConfigError."""
    fields, hints = _fields(cls), _hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys of {cls.__name__}: "
            + ", ".join(prefix + k for k in fields)
        )
    kwargs = {}
    for k, v in data.items():
        f = fields[k]
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            # A partial table overrides the *parent's* default for this section (e.g. a stage's own LoopConfig
            # defaults), not the section class's bare defaults.
            v = merge_config(hints[k], to_dict(f.default_factory()), v)
        kwargs[k] = _convert(v, hints[k], prefix + k)
    missing = [k for k, f in fields.items() if f.metadata.get("required") and not data.get(k)]
    if missing:
        raise ConfigError(f"missing required setting {', '.join(f'--{prefix}{k}' for k in missing)} "
                          f"(no default: see --help)")
    try:
        return cls(**kwargs)
    except (ValueError, KeyError) as e:  # a section's own check (__post_init__), e.g. an unknown size name
        if isinstance(e, ConfigError):
            raise
        message = e.args[0] if isinstance(e, KeyError) else e  # str(KeyError) quotes its message
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {message}") from None


def to_dict(cfg: Any) -> dict:
    """JSON-able dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p} is not a section")
        tree = node
    tree[leaf] = value


def merge_config(cls: type, base: dict, over: dict) -> dict:
    """`over` on top of `base`, both raw dicts for `cls`: tables of nested dataclass sections merge key by key, every
    other value (a dict-typed field's dict included) replaces the base value whole."""
    hints = _hints(cls)
    out = dict(base)
    for k, v in over.items():
        tp = hints.get(k)
        section = tp is not None and dataclasses.is_dataclass(tp)
        out[k] = merge_config(tp, out[k], v) if section and isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_config(cls: type[T], argv: list[str] | None = None, base: dict | None = None) -> T:
    """`cls` defaults <- `base` dict <- `--config FILE.toml` <- `--key=value` (dotted keys for nested fields).

    `--flag` alone means `--flag=true`. `-h/--help` prints every key with its default and exits. A class may map
    short command-line names to dotted keys in a `ALIASES: ClassVar[dict[str, str]]`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    tree: dict = dict(base or {})
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(describe(cls))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value (see --help)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            key, value = arg[2:], "true"
        key = key.replace("-", "_")
        key = getattr(cls, "ALIASES", {}).get(key, key)  # e.g. --resume for --loop.resume
        if key == "config":
            path = Path(value)
            if not path.is_file():
                raise ConfigError(f"config file {path} not found: pass --config=<an existing .toml file>")
            try:
                with open(path, "rb") as f:
                    loaded = tomllib.load(f)  # parsed as data: nothing in a config file is ever executed
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # tomllib decodes UTF-8 itself
                raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
            except OSError as e:
                raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
            tree = merge_config(cls, tree, loaded)
        else:
            _set_dotted(overrides, key, value)
        i += 1
    return from_dict(cls, merge_config(cls, tree, overrides))


def describe(cls, prefix: str = "") -> str:
    """Every key with its type and default: the --help text."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
        shown = "<required>" if f.metadata.get("required") else repr(default)
        name = getattr(tp, "__name__", str(tp))
        lines.append(f"  --{prefix}{f.name}={shown}  ({name})")
    return "\n".join(lines)
