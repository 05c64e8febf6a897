"""The pass registry: name -> Pass class, filled by ``@register_pass`` and by entry points.

Third-party packages register passes through the ``graphopt.passes`` entry-point group: each
entry point names a module (or a Pass class) that is imported on first lookup.
"""

from __future__ import annotations

import difflib
import importlib
import re
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from graphopt.errors import ConfigError
from graphopt.passes.base import Pass

_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False
#: entry-point name -> why it failed to load
_BROKEN: dict[str, str] = {}
_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

#: Modules of the built-in passes; imported on first lookup so `import graphopt.passes` stays
#: cheap.
BUILTIN_MODULES = (
    "graphopt.passes.paddle_native",
    "graphopt.passes.capture_control_flow",
    "graphopt.passes.hoist_host_branch_conditions",
    "graphopt.passes.specialize_branches",
    "graphopt.passes.cudagraph_blacklist_injection",
    "graphopt.passes.piecewise_split",
)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a Pass subclass to the registry under its kebab-case name."""
    if not isinstance(cls, type) or not issubclass(cls, Pass):
        raise TypeError(f"@register_pass expects a Pass subclass, got {cls!r}")
    if not _KEBAB.match(cls.name or ""):
        raise ValueError(f"pass {cls.__name__}: name {cls.name!r} is not kebab-case")
    if not cls.summary or "\n" in cls.summary.strip():
        raise ValueError(f"pass {cls.name}: summary must be one non-empty line")
    other = _REGISTRY.get(cls.name)
    # the same class imported again (a module reloaded) replaces itself; another class with
    # the same pass name, even one with the same class name from another module, is a clash
    if other is not None and other is not cls and (
            (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__)):
        raise ValueError(f"pass name {cls.name!r} is registered twice "
                         f"({other.__module__}.{other.__qualname__} and "
                         f"{cls.__module__}.{cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def load_all() -> None:
    """Import the built-in pass modules and every ``graphopt.passes`` entry point (once).

    A plugin that fails to load does not hide the others: the rest are registered, the broken
    one is named in one warning line, and asking for a pass it provides raises its error.
    """
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    load_plugins("graphopt.passes", BUILTIN_MODULES, Pass, register_pass, _BROKEN)


def load_plugins(group: str, builtin: tuple[str, ...], base: type,
                 register: Callable[[Any], Any], broken: dict[str, str]) -> None:
    """Import the `builtin` modules, then every entry point of `group`: one naming a module
    registers on import, one naming a `base` subclass is passed to `register`. A plug-in that
    fails to load does not hide the others: it is named in one warning line and in `broken`
    (entry-point name -> why), so asking for what it provides can say why it is missing."""
    for mod in builtin:
        importlib.import_module(mod)
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, base):
                register(obj)
        except Exception as e:
            why = f"entry point {group}:{ep.name} ({ep.value}) failed to load: {e}"
            broken[ep.name] = why
            print(f"graphopt: warning: {why}", file=sys.stderr)


def get_pass(name: str) -> type[Pass]:
    """The Pass class registered as `name`; an unknown name lists the candidates."""
    load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in _BROKEN:
            raise ConfigError(f"pass '{name}': {_BROKEN[name]}") from None
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown pass '{name}'.{hint} Registered passes: {', '.join(sorted(_REGISTRY))}"
        ) from None


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass, by name, sorted."""
    load_all()
    return dict(sorted(_REGISTRY.items()))
