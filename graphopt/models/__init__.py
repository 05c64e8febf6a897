"""Model families graphopt can build. ``build_model(cfg)`` dispatches on ``cfg.family``."""

from __future__ import annotations

import importlib
from typing import Any

from graphopt.errors import ConfigError

#: family name -> module that defines ``build(cfg) -> ModelBundle``.
FAMILIES = {
    "deepseek_v3": "graphopt.models.deepseek_v3",
    "tiny": "graphopt.models.tiny",
}


def build_model(cfg: Any):
    """Build the ModelBundle described by the ``model`` config node."""
    family = cfg.get("family")
    if family not in FAMILIES:
        raise ConfigError(
            f"unknown model family {family!r}: choose one of {', '.join(sorted(FAMILIES))}"
        )
    return importlib.import_module(FAMILIES[family]).build(cfg)
