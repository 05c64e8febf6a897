"""Typed pass options: build a pass's options dataclass from a config dict, checking every value.

A pass declares its options as a dataclass (``Pass.Options``). Each field has a type, a default
and a help string, either in the field's metadata or as a ``#:`` comment above it (both are shown
by ``graphopt-passes``)::

    @dataclass
    class Options:
        #: auto: find the functions from SOT's break reasons; explicit: mark `targets`.
        mode: Literal["auto", "explicit"] = "auto"
        targets: list[str] = field(default_factory=list, metadata={"help": "qualified names"})

Supported field types: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``list[T]``,
``tuple[T, ...]``, ``dict`` / ``dict[K, V]``, ``Literal[...]``, ``Optional[T]`` / ``T | None``,
other unions, nested option dataclasses, and ``Any``. Values come from Hydra (OmegaConf nodes are
converted to plain containers first). A pass can check relations between its options in the
dataclass's ``__post_init__``; a ``ValueError``/``TypeError`` raised there becomes a
:class:`~passes.base.ConfigError` naming the pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from graphopt.passes.base import ConfigError, Pass

_MISSING = dataclasses.MISSING


def to_plain(value: Any) -> Any:
    """OmegaConf DictConfig/ListConfig (at any depth) -> plain dict/list; anything else as is."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value


def field_types(options_cls: type) -> dict[str, Any]:
    """Field name -> resolved type of an options dataclass (string annotations evaluated)."""
    module = sys.modules.get(options_cls.__module__)
    globalns = vars(module) if module is not None else {}
    try:
        hints = typing.get_type_hints(options_cls, globalns=globalns)
    except Exception:
        # One annotation that cannot be evaluated (e.g. a name local to a function) must not
        # switch off checking for the others: resolve field by field, leave only it unchecked.
        hints = {}
        for f in dataclasses.fields(options_cls):
            if not isinstance(f.type, str):
                hints[f.name] = f.type
                continue
            try:
                hints[f.name] = eval(f.type, globalns, dict(vars(typing)))  # what typing does
            except Exception:
                hints[f.name] = Any
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(options_cls)}


def type_name(tp: Any) -> str:
    """A short readable name of a type annotation: ``list[str]``, ``'a' | 'b'``, ``int | None``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if args:
            inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
            return f"{name}[{inner}]"
        return name
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """A value does not fit a type; `expected` and `got` phrase the user-facing message."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"expected {expected}, got {got}")
        self.expected = expected
        self.got = got


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, (str, bool, int, float)) or value is None:
        return text
    return f"{type(value).__name__} {text}"


def check_value(tp: Any, value: Any) -> Any:
    """`value` converted to `tp` (lists/tuples normalised, ints widened to float) or _Mismatch."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        # `True == 1` in Python: compare the type too so Literal[1] does not accept True.
        for a in args:
            if value == a and type(value) is type(a):
                return value
        raise _Mismatch("one of " + ", ".join(repr(a) for a in args), _describe(value))
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(a, value)
            except _Mismatch:
                continue
        raise _Mismatch(type_name(tp), _describe(value))
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(type_name(tp), _describe(value))
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            # fixed-length tuple[int, str]
            if len(value) != len(args):
                raise _Mismatch(type_name(tp), f"{len(value)} items {_describe(value)}")
            items = [
                _check_item(a, v, i, tp) for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            elem = args[0] if args else Any
            items = [_check_item(elem, v, i, tp) for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict or origin is Mapping:
        if not isinstance(value, Mapping):
            raise _Mismatch(type_name(tp), _describe(value))
        kt, vt = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in value.items():
            out[_check_item(kt, k, k, tp, what="key")] = _check_item(vt, v, k, tp)
        return out
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch(f"a mapping for {tp.__name__}", _describe(value))
        return _build(tp, value, where=tp.__name__)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("bool", _describe(value))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("int", _describe(value))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch("float", _describe(value))
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("str", _describe(value))
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch(type_name(tp), _describe(value))
    return value  # an annotation we do not understand: accept rather than refuse a valid config


def _check_item(tp: Any, value: Any, where: Any, outer: Any, what: str = "item") -> Any:
    try:
        return check_value(tp, value)
    except _Mismatch as e:
        raise _Mismatch(
            type_name(outer), f"{what} {where!r}: {e.got} (expected {e.expected})"
        ) from None


def _build(options_cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Construct `options_cls` from `values`; errors raise ConfigError prefixed by `where`."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        key = unknown[0]
        if not fields:
            raise ConfigError(f"{where}: takes no options, got '{key}'")
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{where}: unknown option '{key}'.{hint} Valid options: {', '.join(fields)}"
        )
    types_ = field_types(options_cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(
                    f"option '{name}' of {where} is required ({type_name(types_[name])})"
                )
            continue
        try:
            kwargs[name] = check_value(types_[name], values[name])
        except _Mismatch as e:
            raise ConfigError(f"option '{name}' of {where}: {e}") from None
    try:
        return options_cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def build_options(pass_cls: type[Pass], values: Mapping[str, Any] | None) -> Any:
    """An instance of ``pass_cls.Options`` from a config mapping; every key and value checked.

    Unknown keys list the valid options; a wrong type names the option, the pass, what was
    expected and what was given, e.g. ``option 'mode' of pass 'capture-control-flow': expected
    one of 'auto', 'explicit', got 'atuo'``.
    """
    values = to_plain(values) if values is not None else {}
    where = f"pass '{pass_cls.name}'"
    if not isinstance(values, Mapping):
        raise ConfigError(f"options of {where} must be a mapping, got {_describe(values)}")
    return _build(pass_cls.Options, values, where)


def options_to_dict(options: Any) -> dict[str, Any]:
    """The option values of an options dataclass as plain data (for yaml/json and describe())."""
    return {f.name: _plain_value(getattr(options, f.name)) for f in dataclasses.fields(options)}


def _plain_value(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return options_to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_plain_value(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain_value(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def default_value(f: dataclasses.Field) -> Any:
    """The default of an options field (factories called), or MISSING for a required one."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


_FIELD_LINE = re.compile(r"^\s*(?P<name>\w+)\s*:")


def option_help(options_cls: type, name: str) -> str:
    """Help text of an option: ``metadata['help']``, else the field's ``#:`` / trailing comment."""
    for f in dataclasses.fields(options_cls):
        if f.name == name and f.metadata.get("help"):
            return str(f.metadata["help"])
    return _comment_help(options_cls).get(name, "")


def _comment_help(options_cls: type) -> dict[str, str]:
    # Fallback for option classes written with comments instead of metadata: read the source.
    try:
        lines = inspect.getsource(options_cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        m = _FIELD_LINE.match(line)
        if m and not stripped.startswith(("def ", "class ", "@")):
            text = " ".join(pending)
            if not text and "#" in line:
                text = line.split("#", 1)[1].strip()
            if text:
                out.setdefault(m.group("name"), text)
        pending = []
    return out
