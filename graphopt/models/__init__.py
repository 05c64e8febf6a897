"""Model families graphopt can build, and how a user's own model plugs in.

A model config node names its builder one of two ways:

* ``_target_: pkg.module.build`` (Hydra's ``instantiate``): the builder is called with the
  node's other keys as keyword arguments and returns a :class:`graphopt.models.base.ModelBundle`;
* ``family: <name>``: a built-in family (``deepseek_v3``, ``tiny``) or one a package exposes in
  the ``graphopt.models`` entry-point group (``my_model = "pkg.module:build"``), called the same
  way.

Bring-your-own-model configs come in through ``hydra.searchpath`` (README, "Bring your own
model"); nothing in graphopt is edited.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from graphopt.errors import ConfigError, GraphoptError, one_line
from graphopt.models.base import ModelBundle

#: built-in family name -> builder (``module:function``)
FAMILIES = {
    "deepseek_v3": "graphopt.models.deepseek_v3:build",
    "tiny": "graphopt.models.tiny:build",
}


def families() -> dict[str, str]:
    """Every known family: the built-ins plus the ``graphopt.models`` entry points."""
    out = dict(FAMILIES)
    for ep in entry_points(group="graphopt.models"):
        out.setdefault(ep.name, ep.value)
    return out


def builder_path(node: Any) -> str:
    """The dotted path of the builder a model node names (``_target_`` or ``family``)."""
    target = node.get("_target_")
    if target:
        return str(target)
    family = node.get("family")
    known = families()
    if family in known:
        return known[family].replace(":", ".")
    if family is None:
        raise ConfigError("the model config names no builder: give model._target_ "
                          "(a function returning a ModelBundle) or model.family")
    close = difflib.get_close_matches(str(family), known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"model.family={family!r}: unknown.{hint} Known families: "
                      f"{', '.join(sorted(known))} (more through the graphopt.models entry points)")


def untrusted_targets(node: Any, named: Iterable[str] = ()) -> list[str]:
    """The code a saved model config would run that nobody vouched for: its builder unless it
    is a graphopt family, a ``graphopt.models`` entry point (an installed package) or one of
    `named` (builders the caller names, ``module.function``), and every nested ``_target_``
    (Hydra would instantiate those too). Empty: building it runs only trusted builders."""
    trusted = {p.replace(":", ".") for p in families().values()}
    trusted |= {n.replace(":", ".") for n in named}
    out = []
    target = node.get("_target_")
    if target is not None and str(target) not in trusted:
        out.append(str(target))
    if target is None and node.get("family") is not None and node["family"] not in families():
        out.append(f"family {node['family']}")

    def nested(value: Any) -> None:
        if isinstance(value, Mapping):
            if "_target_" in value:
                out.append(str(value["_target_"]))
            for v in value.values():
                nested(v)
        elif isinstance(value, list | tuple):
            for v in value:
                nested(v)

    for key, value in node.items():
        if key != "_target_":
            nested(value)
    return out


def check_builder(node: Any) -> None:
    """Fail now, as one line, if the node's builder cannot be imported (nothing is built)."""
    path = builder_path(node)
    module, _, attr = path.rpartition(".")
    try:
        builder = getattr(importlib.import_module(module), attr) if module else None
    except Exception as e:
        raise ConfigError(f"model._target_={path!r}: cannot import it ({one_line(e)})") from None
    if not callable(builder):
        raise ConfigError(f"model._target_={path!r}: no such function (give module.function)")


def check_model(node: Any) -> None:
    """Run the family's cheap config check, if its builder's module has one (``check(**keys)``:
    reads and validates config files, builds nothing), so a bad model config fails before any
    model is built."""
    path = builder_path(node)
    module_name = path.rsplit(".", 1)[0]
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return  # check_builder reports an unimportable builder
    check = getattr(module, "check", None)
    if not callable(check):
        return
    keys = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) \
        else dict(node)
    keys = {k: v for k, v in keys.items() if k not in ("_target_", "family")}
    check(**keys)


def build_model(node: Any) -> ModelBundle:
    """Build the ModelBundle a ``model`` config node describes."""
    path = builder_path(node)
    cfg = OmegaConf.create(OmegaConf.to_container(node, resolve=True)) \
        if isinstance(node, DictConfig) else OmegaConf.create(dict(node))
    with_target = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "family"])
    with_target["_target_"] = path
    try:
        bundle = instantiate(with_target, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, GraphoptError):
            raise cause from None
        if isinstance(cause, TypeError) and "argument" in str(cause):
            raise ConfigError(f"model: {path} does not take these keys: {one_line(cause)}") \
                from None
        raise ConfigError(f"model._target_={path!r}: {one_line(cause or e)}") from None
    if not isinstance(bundle, ModelBundle):
        raise ConfigError(f"model._target_={path!r} returned {type(bundle).__name__}, "
                          "expected a graphopt.models.ModelBundle")
    return bundle


def save_model(node: Any, out_dir: str | Path) -> list[Path]:
    """Build the model a ``model`` node describes and write it in its family's own checkpoint
    format (DeepSeek-V3: HF ``config.json`` + ``model.safetensors``); return the files.

    A family whose builder module has no ``save(bundle, out_dir)`` cannot be exported.
    """
    path = builder_path(node)
    module = importlib.import_module(path.rsplit(".", 1)[0])
    save = getattr(module, "save", None)
    if not callable(save):
        raise ConfigError(f"model {node.get('name')!r} ({path}) has no checkpoint format to "
                          "export to (its module has no save(bundle, out_dir))")
    return list(save(build_model(node), out_dir))
