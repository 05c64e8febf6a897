"""Typed pass options: a pass's ``Options`` dataclass, filled from config by OmegaConf.

A pass declares its options as a dataclass: typed fields with defaults, ``Enum`` for choices,
range checks in ``__post_init__``, help as ``metadata={"help": ...}`` or a ``#:`` comment above
the field (both shown by ``graphopt-passes``)::

    class Mode(str, enum.Enum):
        auto = "auto"
        explicit = "explicit"

    @dataclass
    class Options:
        #: auto: find the functions from SOT's break reasons; explicit: mark `targets`.
        mode: Mode = Mode.auto
        targets: list[str] = field(default_factory=list)

OmegaConf checks every value against the field types (``OmegaConf.structured``), so a bad
value fails when the pipeline is built, before any model is traced, as one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import re
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from graphopt.errors import ConfigError
from graphopt.passes.base import Pass


def build_options(pass_cls: type[Pass], values: Mapping[str, Any] | Any | None) -> Any:
    """An instance of ``pass_cls.Options`` from a config mapping; every key and value checked.

    Errors are one line naming ``pipeline.options.<pass>.<option>``: an unknown option lists the
    valid ones (with a did-you-mean), a wrong type says what was expected.
    """
    where = f"pipeline.options.{pass_cls.name}"
    if values is None:
        values = {}
    if not isinstance(values, Mapping) and not OmegaConf.is_dict(values):
        raise ConfigError(f"{where}: expected a mapping of option -> value, got {values!r}")
    try:
        schema = OmegaConf.structured(pass_cls.Options)
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"pass '{pass_cls.name}': its Options cannot be typed by OmegaConf "
            f"({_first_line(e)}); use int/float/bool/str, Enum, list[...], dict[str, ...]"
        ) from None
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, values))
    except ConfigKeyError as e:
        key = str(e.key if e.key is not None else e.full_key)
        valid = [f.name for f in dataclasses.fields(pass_cls.Options)]
        if not valid:
            raise ConfigError(f"{where}: the pass takes no options, got '{key}'") from None
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{where}: unknown option '{key}'.{hint} Valid options: {', '.join(valid)}"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}.{e.full_key}: {_first_line(e)}") from None
    except (ValueError, TypeError, ConfigError) as e:  # __post_init__ checks
        raise ConfigError(f"{where}: {e}") from None


def _first_line(e: OmegaConfBaseException) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return msg.strip().splitlines()[0]


def options_to_dict(options: Any) -> dict[str, Any]:
    """The option values of an options dataclass as plain data (for yaml/json and describe())."""
    return {f.name: _plain_value(getattr(options, f.name)) for f in dataclasses.fields(options)}


def _plain_value(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return options_to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_plain_value(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain_value(x) for k, x in v.items()}
    return v


def default_value(f: dataclasses.Field) -> Any:
    """The default of an options field (factories called), or MISSING for a required one."""
    if f.default is not dataclasses.MISSING:
        return _plain_value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _plain_value(f.default_factory())
    return dataclasses.MISSING


def type_name(tp: Any) -> str:
    """A short readable name of an option's type: ``list[str]``, ``auto | explicit``."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(str(m.value) for m in tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (origin is not None and origin.__name__ == "UnionType"):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else str(origin)
    return getattr(tp, "__name__", str(tp))


def field_types(options_cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of an options dataclass."""
    try:
        hints = typing.get_type_hints(options_cls)
    except Exception:  # an annotation that cannot be evaluated: show it as written
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(options_cls)}


_FIELD_LINE = re.compile(r"^\s*(?P<name>\w+)\s*:")


def option_help(options_cls: type, name: str) -> str:
    """Help text of an option: ``metadata['help']``, else the field's ``#:`` comment."""
    for f in dataclasses.fields(options_cls):
        if f.name == name and f.metadata.get("help"):
            return str(f.metadata["help"])
    try:
        lines = inspect.getsource(options_cls).splitlines()
    except (OSError, TypeError):
        return ""
    pending: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        m = _FIELD_LINE.match(line)
        if m and m.group("name") == name and pending:
            return " ".join(pending)
        pending = []
    return ""
