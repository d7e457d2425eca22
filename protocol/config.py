"""Typed TOML configuration, shared by agent and HQ.

A configuration is a dataclass whose fields are sections (themselves dataclasses) or tables of
sections (`dict[str, Section]`, e.g. collections). Each setting is a dataclass field with a default,
a docstring in `metadata["doc"]` and an optional `metadata["check"]` returning an error text. Loading
refuses unknown keys, wrong types and failed checks with the file, the key path and the reason, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file is unreadable or holds a bad value; the message names file and key."""

    def __init__(self, path: Path | str, key: str, reason: str) -> None:
        self.path, self.key, self.reason = str(path), key, reason
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + reason)


def setting(default: Any, doc: str, check: typing.Callable[[Any], str | None] | None = None) -> Any:
    """Declare one setting: its default, what it is for, and an optional validity check."""
    meta = {"doc": doc, "check": check}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def at_least(low: float) -> typing.Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"must be at least {low}"


def between(low: float, high: float) -> typing.Callable[[Any], str | None]:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def listen_address(value: Any) -> str | None:
    """HOST:PORT; port 0 asks the system for a free port (the daemon prints the real one)."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        return "must be HOST:PORT, e.g. 127.0.0.1:8470"
    return None


def _type_error(expected: Any, value: Any) -> str | None:
    """None if value fits the annotation `expected`, else a reason."""
    origin = typing.get_origin(expected)
    if origin is typing.Literal:
        options = typing.get_args(expected)
        return None if value in options else "must be one of " + ", ".join(map(repr, options))
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(expected)
        if any(_type_error(opt, value) is None for opt in options):
            return None
        return "must be " + " or ".join(_type_name(o) for o in options)
    if origin is list:
        (item,) = typing.get_args(expected)
        if not isinstance(value, list):
            return f"must be a list of {_type_name(item)}"
        for i, element in enumerate(value):
            if (reason := _type_error(item, element)) is not None:
                return f"item {i} {reason}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else "must be a table"
    if expected is type(None):
        return None if value is None else "must be empty"
    if expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be an integer"
    if expected is Path:
        return None if isinstance(value, str) and value else "must be a non-empty path"
    if expected is str:
        return None if isinstance(value, str) else "must be a string"
    if expected is bool:
        return None if isinstance(value, bool) else "must be true or false"
    return None if isinstance(value, expected) else f"must be {_type_name(expected)}"


def _type_name(annotation: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def build(cls: type[T], data: dict[str, Any], path: Path | str, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a TOML table, checking keys, types and values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(path, prefix + key, f"unknown setting (known: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        annotation = hints[name]
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
                    kwargs[name] = build(annotation, {}, path, key + ".")
                    continue
                raise ConfigError(path, key, "is required")
            continue
        value = data[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(path, key, "must be a table")
            kwargs[name] = build(annotation, value, path, key + ".")  # type: ignore[arg-type]
            continue
        if typing.get_origin(annotation) is dict:
            item_cls = typing.get_args(annotation)[1]
            if dataclasses.is_dataclass(item_cls):
                if not isinstance(value, dict):
                    raise ConfigError(path, key, "must be a table")
                kwargs[name] = {
                    sub: build(item_cls, table, path, f"{key}.{sub}.")  # type: ignore[arg-type]
                    if isinstance(table, dict)
                    else _raise(ConfigError(path, f"{key}.{sub}", "must be a table"))
                    for sub, table in value.items()
                }
                continue
        if (reason := _type_error(annotation, value)) is not None:
            raise ConfigError(path, key, f"{reason}, got {value!r}")
        if annotation is Path or Path in typing.get_args(annotation):
            value = Path(value) if isinstance(value, str) else value
        check = f.metadata.get("check")
        if check is not None and value is not None and (reason := check(value)) is not None:
            raise ConfigError(path, key, f"{reason}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _raise(error: Exception) -> typing.NoReturn:
    raise error


def read_toml(path: Path | str) -> dict[str, Any]:
    """Parse a TOML file; a missing file or bad syntax is a ConfigError naming the file (and the
    line and column, for syntax)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(path, "", "file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from e


def load(cls: type[T], path: Path | str) -> T:
    """Read and validate a TOML file into `cls`; every failure is a ConfigError naming the file."""
    return build(cls, read_toml(path), path)


def documented_keys(cls: type, prefix: str = "") -> dict[str, str]:
    """Every setting's dotted key and its doc text (for the configuration reference test)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            out.update(documented_keys(annotation, prefix + f.name + "."))  # type: ignore[arg-type]
        elif typing.get_origin(annotation) is dict and dataclasses.is_dataclass(
            typing.get_args(annotation)[1]
        ):
            out.update(documented_keys(typing.get_args(annotation)[1], prefix + f.name + ".*."))
        else:
            out[prefix + f.name] = f.metadata.get("doc", "")
    return out
