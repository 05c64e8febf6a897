"""The op table: PIR op name -> lowering, and what a lowering sees of its op.

A lowering runs ONCE per op, when a program is lowered. It reads the op's attributes (and the
operands that are constants) through an :class:`OpInfo` and returns a *kernel*: a plain function
of the op's operand values (torch tensors; Python lists for vector values) that returns the
op's result (one value), or a tuple of results when the op has several. Everything the kernel
does not need to decide per run is decided in the lowering, so a run costs PyTorch's dispatch
and not an interpreter's::

    @lowering("pd_op.matmul")
    def _matmul(op: OpInfo) -> Kernel:
        tx, ty = op.attr("transpose_x"), op.attr("transpose_y")
        ...
        return lambda x, y: torch.matmul(...)

Operand roles, declared on the decorator:

* tensor operands (the default) arrive on the device the op runs on (lower_program moves
  host values there: constants once at lower time, runtime host values per run);
* ``host_operands`` are read as host data by the kernel (a shape, an axis, ``k``): they are
  never moved to the device; reading one that lives on the device is a synchronisation, which
  lower_program records as a sync point;
* ``meta_operands`` are only looked at for their shape/dtype (``shape64``'s input): never moved,
  never a sync.

:meth:`OpInfo.bake` takes a constant operand's value at lower time; the kernel then receives
``None`` in that position (nothing is read or copied per run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import paddle
import torch

from graphopt.runtime.lowering.convert import torch_dtype

#: a lowered op: operand values in, the result (or a tuple of results) out
Kernel = Callable[..., Any]
#: a lowering: the op's lower-time view in, its kernel out
Lowering = Callable[["OpInfo"], Kernel]

#: PIR op name -> lowering (filled by :func:`lowering`)
OPS: dict[str, Callable[..., Any]] = {}

_MISSING = object()


def lowering(*names: str, host_operands: Iterable[int] = (), meta_operands: Iterable[int] = (),
             foldable: bool = True, syncs: str = "", structural: bool = False
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the lowering of the PIR ops `names`.

    `host_operands` / `meta_operands`: operand positions read as host data / only for their
    metadata (see the module docstring). `foldable`: whether an op whose operands are all
    constants may be computed once at lower time (False for ops with effects or randomness).
    `syncs`: a non-empty reason when the kernel itself always reads device data on the host
    (e.g. an output shape that depends on the values); recorded as a sync point when the op runs
    on the device. `structural`: the function is called as ``fn(lowerer, op)`` and returns a
    step (control flow, feeds, outputs); only :mod:`graphopt.runtime.lowering.program` uses it.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.host_operands = frozenset(host_operands)  # type: ignore[attr-defined]
        fn.meta_operands = frozenset(meta_operands)  # type: ignore[attr-defined]
        fn.foldable = foldable  # type: ignore[attr-defined]
        fn.syncs = syncs  # type: ignore[attr-defined]
        fn.structural = structural  # type: ignore[attr-defined]
        for name in names:
            other = OPS.get(name)
            # the same function again (a module reloaded) replaces itself; another one is a clash
            if other is not None and (other.__module__, other.__qualname__) != (
                    fn.__module__, fn.__qualname__):
                raise ValueError(f"{name} has two lowerings: {other.__module__}."
                                 f"{other.__qualname__} and {fn.__module__}.{fn.__qualname__}")
            OPS[name] = fn
        return fn

    return register


def lowering_flags(fn: Callable[..., Any]) -> tuple[frozenset[int], frozenset[int], bool, str,
                                                      bool]:
    """``(host_operands, meta_operands, foldable, syncs, structural)`` of a table entry; a plain
    function put into :data:`OPS` by hand gets the defaults."""
    return (getattr(fn, "host_operands", frozenset()), getattr(fn, "meta_operands", frozenset()),
            getattr(fn, "foldable", True), getattr(fn, "syncs", ""),
            getattr(fn, "structural", False))


def _static_shape(value: paddle.pir.Value) -> list[int] | None:
    try:
        return list(value.shape)
    except Exception:  # a vector (builtin.combine) has no shape
        return None


def _dtype_of(value: paddle.pir.Value) -> torch.dtype | None:
    try:
        return torch_dtype(value.dtype)
    except Exception:  # a vector, or a dtype torch lacks
        return None


class OpInfo:
    """One op as its lowering sees it, at lower time only (kernels never hold one).

    Static shapes in a PIR program are those of the traced batch: only their *rank* is reliable
    at run time (a step runs with other token counts), so kernels take sizes from their inputs.
    """

    def __init__(self, op: paddle.pir.Operation, device: torch.device,
                 consts: dict[int, Any] | None = None,
                 location: Callable[[], str | None] | None = None,
                 on_device: bool | None = None) -> None:
        self.op = op
        self.name: str = op.name()
        #: the torch device the kernel runs on (make new tensors there)
        self.device = device
        #: whether the op has a device result (it runs on the device, or on the CPU standing
        #: in for it when the program is lowered for the CPU)
        self.on_device = device.type != "cpu" if on_device is None else on_device
        self._attrs: dict[str, Any] = op.attrs()
        self._consts = consts or {}
        self._location = location
        #: operand positions whose constant value the lowering took (their kernel arg is None)
        self.baked: set[int] = set()
        self.num_operands: int = op.num_operands()
        self.num_results: int = op.num_results()

    # -- attributes ---------------------------------------------------------------------------
    def attr(self, name: str, default: Any = _MISSING) -> Any:
        """The attribute `name` as Paddle stores it (KeyError naming the op when absent and no
        default is given)."""
        if name in self._attrs:
            return self._attrs[name]
        if default is _MISSING:
            raise KeyError(f"{self.name} has no attribute {name!r} (has: "
                           f"{', '.join(sorted(self._attrs))})")
        return default

    def dtype_attr(self, name: str = "dtype") -> torch.dtype | None:
        """A dtype attribute as a torch dtype; None for Paddle's UNDEFINED (``sum``'s default)."""
        value = self.attr(name)
        if getattr(value, "name", "") == "UNDEFINED":
            return None
        return torch_dtype(value)

    @property
    def location(self) -> str | None:
        """``file:line (function)`` of the user code that built the op, when Paddle kept it."""
        return self._location() if self._location is not None else None

    # -- operands and results -------------------------------------------------------------------
    def is_const(self, i: int) -> bool:
        """Whether operand `i` is a constant known at lower time."""
        return i in self._consts

    def bake(self, i: int) -> Any:
        """The lower-time value of operand `i` (a CPU tensor, or a list for a vector) if it is a
        constant, else None. When a value is returned the kernel gets ``None`` for operand `i`."""
        if i not in self._consts:
            return None
        self.baked.add(i)
        return self._consts[i]

    def bake_ints(self, i: int) -> list[int] | None:
        """Operand `i` as a list of Python ints (a shape, axes) if it is a constant."""
        value = self.bake(i)
        return None if value is None else host_ints(value)

    def bake_scalar(self, i: int) -> Any:
        """Operand `i` as one Python number if it is a constant."""
        value = self.bake(i)
        return None if value is None else host_scalar(value)

    def in_rank(self, i: int) -> int:
        """The rank of operand `i` (reliable, unlike its sizes)."""
        shape = _static_shape(self.op.operand_source(i))
        if shape is None:
            raise ValueError(f"operand {i} of {self.name} has no rank (a vector?)")
        return len(shape)

    def out_rank(self, j: int = 0) -> int:
        shape = _static_shape(self.op.result(j))
        if shape is None:
            raise ValueError(f"result {j} of {self.name} has no rank (a vector?)")
        return len(shape)

    def in_dtype(self, i: int) -> torch.dtype | None:
        """The torch dtype of operand `i` (None for a vector)."""
        return _dtype_of(self.op.operand_source(i))

    def out_dtype(self, j: int = 0) -> torch.dtype | None:
        """The torch dtype of result `j` (None for a vector)."""
        return _dtype_of(self.op.result(j))

    def has_operand(self, i: int) -> bool:
        """Whether optional operand `i` is given (Paddle passes a null value otherwise)."""
        if i >= self.num_operands:
            return False
        v = self.op.operand_source(i)
        return v is not None and v.initialized()


def host_ints(value: Any) -> list[int]:
    """A host int array (a CPU tensor, a vector of scalar tensors, ints) as a list of ints."""
    if isinstance(value, torch.Tensor):
        out = value.tolist()
        return out if isinstance(out, list) else [out]
    if isinstance(value, (list, tuple)):
        flat: list[int] = []
        for v in value:
            flat.extend(host_ints(v))
        return flat
    return [int(value)]


def host_scalar(value: Any) -> Any:
    """A one-element host value as a Python number."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item() if value.numel() == 1 else _bad_scalar(value)
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            return _bad_scalar(value)
        return host_scalar(value[0])
    return value


def _bad_scalar(value: Any) -> Any:
    raise ValueError(f"expected one element, got {value!r}")


def normalize_axis(axis: int, rank: int) -> int:
    """Paddle's negative axis rule: ``axis + rank`` when negative."""
    return axis + rank if axis < 0 else axis
