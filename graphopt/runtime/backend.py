"""Execution backends: what runs a plan's programs, owns their tensors and captures graphs.

A backend is a small class registered by name, like a pass::

    @register_backend
    class MyBackend(Backend):
        name = "my_backend"
        summary = "one line"

Built-ins: ``none`` (Paddle's ``run_program``, uncaptured), ``emulator`` (Paddle plus the CPU
replay emulator), ``cuda`` (Paddle's CUDA graphs, CUDA builds of Paddle only), ``torch_cpu``
(the PIR-to-PyTorch lowering on the CPU, uncaptured) and ``torch_cuda`` (that lowering on a GPU,
captured with ``torch.cuda.CUDAGraph``). A package adds its own through the
``graphopt.backends`` entry-point group (``name = "pkg.module"`` or ``"pkg.module:Class"``);
nothing in graphopt is edited.

A backend owns its tensors: step inputs enter its memory once per step (:meth:`Backend.
from_step`), values passed between segments stay there (on the device for a GPU backend), and
only host values (hoisted conditions, host meta fields) are read on the host. Capture
orchestration (sizes, padding, warm-ups, one graph per (segment or variant, size), checked
captures) is :mod:`graphopt.runtime.capture`, one code path for every backend; a backend only
supplies the capture primitive (:meth:`warmup`, :meth:`capture`, :meth:`replay`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import paddle

from graphopt.errors import ConfigError
from graphopt.ir.segment_plan import Segment
from graphopt.passes.registry import load_plugins
from graphopt.runtime.executor import RunnerPool

_REGISTRY: dict[str, type[Backend]] = {}
_LOADED = False
_BROKEN: dict[str, str] = {}

#: modules of the built-in backends, imported on first lookup (torch is imported only when a
#: torch backend is made)
BUILTIN_MODULES = ("graphopt.runtime.paddle_backends", "graphopt.runtime.torch_backends")


class Backend:
    """Runs programs uncaptured and, when :attr:`captures`, captures and replays segments.

    Values are whatever the backend calls a tensor (Paddle tensors, torch tensors); the step
    executors pass them through without looking inside, except to read an ``if`` condition on
    the host (:meth:`condition`).
    """

    #: the registry name (``runtime.backend=<name>``)
    name: ClassVar[str] = ""
    #: one line for ``graphopt --list-backends`` style listings and error messages
    summary: ClassVar[str] = ""
    #: whether captured segments become graphs (False: every segment runs uncaptured)
    captures: ClassVar[bool] = True
    #: what runs the programs, in words for reports ("paddle": Paddle's own executor)
    engine: ClassVar[str] = "paddle"

    def __init__(self, pool: RunnerPool) -> None:
        self.pool = pool

    # -- availability ------------------------------------------------------------------------
    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run in this process (None: it can). Checked in the
        preflight, before any model is built."""
        return None

    # -- tensors -------------------------------------------------------------------------------
    @property
    def params(self) -> Mapping[str, Any]:
        """The model's weights and constant buffers, in this backend's memory."""
        return self.pool.params

    def from_step(self, value: paddle.Tensor, host: bool, reuse: Any | None) -> Any:
        """A step input (``arg.<i>``, ``meta.<field>``) in this backend's memory.

        `host`: the model declared it a host input (it stays on the host). `reuse`: what this
        input (same name, shape and dtype) became on an earlier step, or None. A backend may
        write the new value into `reuse` and return it: a graph captured on that tensor then
        reads each step's input where it is, as a serving engine's persistent input buffers
        and KV caches are read, with no copy at replay. Called once per input per step.
        """
        return value

    def to_numpy(self, value: Any) -> np.ndarray:
        """A value as a host array (for comparisons and reports, never on the hot path)."""
        return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)

    def condition(self, value: Any) -> bool:
        """The host-side truth of a one-element ``if`` condition."""
        return condition_value(value)

    def check_programs(self, programs: list[paddle.pir.Program]) -> None:
        """Refuse, before anything runs, programs this backend cannot run (one line)."""

    def note_plan(self, plan: Any) -> None:
        """Told once per plan this backend will capture segments of (a SegmentPlan): e.g. which
        values are results of eager ifs, whose producer changes with the branch taken."""

    # -- uncaptured execution ----------------------------------------------------------------
    def run_program(self, program: paddle.pir.Program, feeds: Mapping[str, Any]) -> list[Any]:
        """Run `program` once, uncaptured: its outputs in order."""
        return self.pool.get(program).run(feeds)

    # -- the capture primitive (backends with ``captures``) ----------------------------------
    def warmup(self, seg: Segment, feeds: Mapping[str, Any]) -> None:
        """Run the segment once, uncaptured (allocator / autotuning warm-up)."""
        self.run_program(seg.program, feeds)

    def capture(self, seg: Segment, size: int, feeds: Mapping[str, Any]) -> Any:
        """Capture the segment at capture size `size` with these inputs; return the graph."""
        raise NotImplementedError(f"backend {self.name!r} does not capture")

    def replay(self, graph: Any, feeds: Mapping[str, Any]) -> list[Any]:
        """Copy `feeds` into the graph's static inputs, replay, return the live-out values."""
        raise NotImplementedError(f"backend {self.name!r} does not capture")

    def static_bytes(self, graph: Any, seg: Segment, feeds: Mapping[str, Any]) -> int:
        """Bytes of the inputs a replay of `graph` copies into its static buffers."""
        return sum(nbytes(feeds[n]) for n in seg.feed_names)

    def run_uncaptured(self, seg: Segment, feeds: Mapping[str, Any]) -> list[Any]:
        """Run the original segment program (no graph): the reference a checked capture is
        compared with, and how a dropped graph's segment runs from then on."""
        return self.run_program(seg.program, feeds)


def condition_value(cond: Any) -> bool:
    """The host-side truth of an ``if`` condition (a one-element bool tensor or array)."""
    if cond is None:  # e.g. a fetch that produced nothing: never guess a branch
        raise ValueError("if condition has no value")
    shape = getattr(cond, "shape", None)
    if shape is not None and hasattr(cond, "item"):  # a Paddle or torch tensor
        if math.prod(shape) != 1:  # (Tensor.size goes through numpy: slow per step)
            raise ValueError(f"if condition must have one element, got shape {list(shape)}")
        return bool(cond.item())
    arr = np.asarray(cond)
    if arr.dtype == object or arr.size != 1:
        raise ValueError(f"if condition must have one element, got shape {list(arr.shape)}")
    return bool(arr.reshape(-1)[0])


def nbytes(value: Any) -> int:
    """Size of a tensor or array in bytes, without copying it to the host."""
    if isinstance(value, paddle.Tensor):
        return int(np.prod(value.shape, dtype=np.int64)) * value.element_size()
    if hasattr(value, "element_size") and hasattr(value, "numel"):  # torch
        return int(value.numel()) * int(value.element_size())
    return int(np.asarray(value).nbytes)


# -- registry ----------------------------------------------------------------------------------
def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a Backend subclass to the registry under its name."""
    if not isinstance(cls, type) or not issubclass(cls, Backend):
        raise TypeError(f"@register_backend expects a Backend subclass, got {cls!r}")
    if not cls.name or not cls.name.replace("_", "").isalnum() or cls.name != cls.name.lower():
        raise ValueError(f"backend {cls.__name__}: name {cls.name!r} must be lower_snake_case")
    if not cls.summary or "\n" in cls.summary.strip():
        raise ValueError(f"backend {cls.name}: summary must be one non-empty line")
    other = _REGISTRY.get(cls.name)
    if other is not None and (other.__module__, other.__qualname__) != (
            cls.__module__, cls.__qualname__):
        raise ValueError(f"backend name {cls.name!r} is registered twice ({other.__module__}."
                         f"{other.__qualname__} and {cls.__module__}.{cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    load_plugins("graphopt.backends", BUILTIN_MODULES, Backend, register_backend, _BROKEN)


def backend_names() -> list[str]:
    """Every registered backend name, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def get_backend(name: str) -> type[Backend]:
    """The Backend class registered as `name`; an unknown name lists the candidates."""
    _load_all()
    name = str(getattr(name, "value", name))
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in _BROKEN:
            raise ConfigError(f"runtime.backend={name}: {_BROKEN[name]}") from None
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"runtime.backend={name}: unknown backend.{hint} Choose one of "
                          f"{', '.join(sorted(_REGISTRY))}") from None


def check_backend(name: str) -> type[Backend]:
    """`name`'s class, or one ConfigError line saying why it cannot run here."""
    cls = get_backend(name)
    why = cls.unavailable()
    if why:
        raise ConfigError(f"runtime.backend={cls.name}: {why}")
    return cls


#: makes the backend of one step executor target: (backend name, runner pool) -> backend
BackendFactory = Callable[[str, RunnerPool], Backend]


def make_backend(name: str | Backend, pool: RunnerPool) -> Backend:
    """The backend called `name`, made over `pool` (an instance is returned as it is)."""
    if isinstance(name, Backend):
        return name
    return check_backend(name)(pool)
