"""graphopt passes: the framework (Pass, registry, PassManager) and the built-in passes."""

from graphopt.errors import ConfigError, PassError
from graphopt.passes.base import PRESERVES_PROGRAM, NoOptions, Pass, PassRecord, PassResult, Stage
from graphopt.passes.registry import all_passes, get_pass, register_pass

__all__ = [
    "PRESERVES_PROGRAM",
    "ConfigError",
    "NoOptions",
    "Pass",
    "PassError",
    "PassRecord",
    "PassResult",
    "Stage",
    "all_passes",
    "get_pass",
    "register_pass",
]
