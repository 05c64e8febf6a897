"""The pass registry: name -> Pass class, filled by ``@register_pass`` and by entry points.

Third-party packages register passes through the ``graphopt.passes`` entry-point group: each
entry point names a module (or a Pass class) that is imported on first lookup.
"""

from __future__ import annotations

import difflib
import importlib
import re
from importlib.metadata import entry_points

from graphopt.errors import ConfigError
from graphopt.passes.base import Pass

_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False
_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

#: Modules of the built-in passes; imported lazily so `import passes` stays cheap.
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
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name {cls.name!r} is registered twice ({other} and {cls})")
    _REGISTRY[cls.name] = cls
    return cls


def load_all() -> None:
    """Import the built-in pass modules and every ``graphopt.passes`` entry point (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # A built-in module that is not written yet is skipped; any other import error is a bug.
            if e.name != mod:
                raise
    for ep in entry_points(group="graphopt.passes"):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not hide the others, but must be visible
            raise ConfigError(
                f"entry point graphopt.passes:{ep.name} ({ep.value}) failed to load: {e}"
            ) from e
        if isinstance(obj, type) and issubclass(obj, Pass):
            register_pass(obj)


def get_pass(name: str) -> type[Pass]:
    """The Pass class registered as `name`; an unknown name lists the candidates."""
    load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown pass '{name}'.{hint} Registered passes: {', '.join(sorted(_REGISTRY))}"
        ) from None


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass, by name, sorted."""
    load_all()
    return dict(sorted(_REGISTRY.items()))
