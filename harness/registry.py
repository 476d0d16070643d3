"""The method registry: ``@register_method("name")`` for built-ins, entry points for third-party packages.

Third-party packages declare, in their ``pyproject.toml``::

    [project.entry-points."mbqbench.methods"]
    mymethod = "my_package.module:MyMethod"

and ``MyMethod`` (a :class:`harness.method.Method` subclass) becomes available as ``mymethod``. Discovery is
lazy (on the first lookup) and a name registered twice by different classes is an error.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from harness.errors import ConfigError, MbqError

if TYPE_CHECKING:
    from harness.method import Method

ENTRY_POINT_GROUP = "mbqbench.methods"
BUILTIN_PACKAGE = "methods"

_REGISTRY: dict[str, type[Method]] = {}
_discovered = False


class DuplicateMethodError(MbqError):
    """Two different classes claim the same method name."""


def _add(name: str, cls: type[Method], origin: str) -> None:
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise DuplicateMethodError(
            f"method name {name!r} is registered twice: {existing.__module__}.{existing.__qualname__} and "
            f"{cls.__module__}.{cls.__qualname__} ({origin})")
    _REGISTRY[name] = cls


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name`` and set ``cls.name``."""
    from harness.method import Method

    def decorate(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) needs a Method subclass, got {cls!r}")
        cls.name = name
        _add(name, cls, "decorator")
        return cls

    return decorate


def discover(force: bool = False) -> None:
    """Import the built-in methods and load every ``mbqbench.methods`` entry point (once)."""
    global _discovered
    if _discovered and not force:
        return
    _discovered = True
    from harness.method import Method

    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg:  # sub-packages (methods.quant) hold building blocks, not methods
            importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party package must not hide the others' error message
            raise MbqError(f"entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise MbqError(f"entry point {ep.name!r} ({ep.value}) is not a Method subclass")
        if getattr(cls, "name", None) in (None, "", Method.name):
            cls.name = ep.name
        _add(ep.name, cls, f"entry point {ep.value}")


def list_methods() -> list[str]:
    discover()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    discover()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def unregister(name: str) -> None:
    """Remove ``name`` (tests and interactive use)."""
    _REGISTRY.pop(name, None)
