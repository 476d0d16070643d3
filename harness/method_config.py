"""Method configs: the frozen base every method's options derive from, and ``NAME:KEY=VALUE`` parsing.

A method's config is a frozen dataclass whose field defaults are its paper's; ``MethodConfig.from_options`` builds
one from command-line strings (converted by each field's type hint), and ``__post_init__`` checks every value, so
a bad option is one ``error:`` line before any file is written.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal

from harness.config import JsonConfig
from harness.errors import ConfigError


@dataclass(frozen=True)
class MethodConfig(JsonConfig):
    """Base of every method's config; subclasses add fields whose defaults are the paper's.

    ``__post_init__`` checks every ``Literal`` field's value and the basic type of int/float/bool fields;
    subclasses that add range checks call ``super().__post_init__()`` first.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            check_field_type(type(self).__name__, f.name, getattr(self, f.name), hints[f.name])

    @classmethod
    def option_lines(cls) -> list[str]:
        """``name: type = default`` for every option (what ``list methods -v`` prints)."""
        hints = typing.get_type_hints(cls)
        lines = []
        for f in fields(cls):
            hint = hints[f.name]
            text = repr(hint) if typing.get_origin(hint) else getattr(hint, "__name__", repr(hint))
            text = text.replace("typing.", "")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
            lines.append(f"{f.name}: {text} = {shown}")
        return lines

    @classmethod
    def from_options(cls, options: dict[str, str]):
        """Build from ``KEY=VALUE`` strings, converting each value by the field's type hint."""
        known = {f.name for f in fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for key, text in options.items():
            if key not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise ConfigError(f"{cls.__qualname__.split('.')[0]} has no option {key!r}; options: {listed}")
            values[key] = convert_option(key, text, hints[key])
        return cls(**values)


def check_field_type(owner: str, name: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal and value not in args:
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(map(str, args))}, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{owner}.{name} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{owner}.{name} must be an integer, got {value!r}")
    if hint is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ConfigError(f"{owner}.{name} must be a finite number, got {value!r}")


def convert_option(key: str, text: str, hint: Any) -> Any:
    """Convert a command-line string to ``hint`` (int, float, bool, str, Literal, Optional, tuple of int).

    Values that are not strings pass through unchanged; the config's ``__post_init__`` checks them.
    """
    if not isinstance(text, str):
        return text
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert_option(key, text, inner[0])
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"option {key}={text!r} must be one of {', '.join(map(str, args))}")
        return text
    if origin is tuple:
        return tuple(convert_option(key, part, args[0]) for part in text.split("/") if part)
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        raise ConfigError(f"option {key}={text!r} is not a valid {hint.__name__}") from None
    return text


def parse_method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``NAME[:KEY=VALUE...]`` into the name and its raw options."""
    parts = spec.strip().split(":")
    name = parts[0].strip()
    if not name:
        raise ConfigError(f"empty method name in {spec!r}")
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method option {part!r} in {spec!r} is not KEY=VALUE")
        if key.strip() in options:
            raise ConfigError(f"option {key.strip()!r} is given twice in {spec!r}")
        options[key.strip()] = value.strip()
    return name, options
