"""Typed recipe configs: dataclass <-> YAML, `key=value` overrides (dots for nesting), typo suggestions.

A recipe declares one dataclass whose fields carry attribute docstrings (a string literal right below the field);
`--help` prints them. `parse_cli(Config, argv)` reads `--config preset.yaml` then applies `key=value` overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlswift.errors import RlswiftError
from rlswift.registry import suggest

C = TypeVar("C")


class ConfigError(RlswiftError, ValueError):
    """A config value or key is wrong; the message names it and the fix."""


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass, read from its source (``{field: doc}``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={value!r} is not a boolean; write true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not an integer") from None
        if f != int(f):
            raise ConfigError(f"{key}={value!r} is not an integer")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and "name" in {f.name for f in dataclasses.fields(tp)}:
            value = {"name": value}  # `optimizer=adamw_8bit` is short for `optimizer.name=adamw_8bit`
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; set its fields as {key}.<field>=value")
        return from_dict(tp, value, prefix=f"{key}.")
    return value


def from_dict(cls: type[C], data: dict, prefix: str = "") -> C:
    """Build ``cls`` from a (possibly partial) nested dict; unknown keys raise with the closest valid name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{suggest(key, list(fields))} "
                f"Valid keys: {', '.join(prefix + k for k in fields)}"
            )
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists (YAML- and JSON-able)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. max_steps=20 or lora.rank=8)")
        key, _, raw = item.partition("=")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node.get(part), str):
                node[part] = {"name": node[part]}  # `optimizer=adamw_8bit optimizer.x=1`: the shorthand, then a field
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load(cls: type[C], config_path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults <- YAML preset <- overrides, validated into ``cls``."""
    data: dict = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist (presets live in recipes/*.yaml)")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
        data = loaded
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def help_text(cls: type, prog: str) -> str:
    """A `--help` listing of every field with its default and docstring."""
    lines = [f"usage: {prog} [--config PRESET.yaml] [key=value ...]", ""]

    def walk(c: type, prefix: str) -> None:
        docs = field_docs(c)
        hints = _hints(c)
        for f in dataclasses.fields(c):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
            lines.append(f"  {prefix}{f.name} = {default!r}")
            if f.name in docs:
                lines.extend("      " + ln for ln in textwrap.wrap(docs[f.name], 96))

    walk(cls, "")
    return "\n".join(lines)


def parse_cli(cls: type[C], argv: list[str] | None, prog: str) -> C:
    """Parse ``[--config X.yaml] [key=value ...]`` (and ``--help``) into ``cls``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, prog))
        raise SystemExit(0)
    config_path = None
    rest = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path, e.g. --config recipes/grpo_tiny.yaml")
            config_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            raise ConfigError(f"unknown option {arg!r}; options are --config and --help, settings are key=value")
        else:
            rest.append(arg)
        i += 1
    return load(cls, config_path, rest)


def changed_keys(saved: dict, current: dict, allowed: set[str], prefix: str = "",
                 defaults: dict | None = None) -> list[str]:
    """Keys whose values differ between two config dicts, except those in ``allowed`` (dotted names).

    With ``defaults`` (the config's default values), a key the saved config lacks counts as unchanged when its
    current value is the default: a key added in a later rlswift version keeps the old behaviour at its default.
    """
    out = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        if name in allowed:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        default = (defaults or {}).get(key, "<absent>")
        if key not in saved and defaults is not None and b == default:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, allowed, name + ".", default if isinstance(default, dict) else None))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
