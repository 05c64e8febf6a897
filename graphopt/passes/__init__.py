"""graphopt passes: the framework (Pass, registry, PassManager) and the built-in passes."""

from graphopt.passes.base import ConfigError, NoOptions, Pass, PassError, PassResult, Stage
from graphopt.passes.registry import all_passes, get_pass, register_pass

__all__ = [
    "ConfigError",
    "NoOptions",
    "Pass",
    "PassError",
    "PassResult",
    "Stage",
    "all_passes",
    "get_pass",
    "register_pass",
]
