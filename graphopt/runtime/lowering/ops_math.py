"""Elementwise lowerings: unary math, binary arithmetic and comparisons, ``scale``, ``pow``,
``cast``, ``where``, ``clip``.

Paddle's integer semantics are kept where they differ from torch's defaults: ``divide`` of
integers truncates toward zero, ``floor_divide`` floors, ``scale`` and ``pow`` on an integer
tensor first cast their float factors to the tensor's type (``scale(int64 x, 0.5)`` is
``x * 0``). A result whose dtype torch would promote differently from the PIR type is cast to
the PIR type (decided once, at lower time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from graphopt.runtime.lowering.convert import is_integral
from graphopt.runtime.lowering.registry import Kernel, OpInfo, lowering


def _probe_dtype(op: OpInfo, fn: Callable[..., torch.Tensor], n: int) -> torch.dtype | None:
    """The dtype `fn` gives for this op's operand dtypes and ranks (a 0-d operand promotes
    like a scalar in torch), found by running it once on ones; None when it cannot be run."""
    args = []
    for i in range(n):
        dtype = op.in_dtype(i)
        if dtype is None:
            return None
        args.append(torch.ones((1,) * op.in_rank(i), dtype=dtype))
    try:
        return fn(*args).dtype
    except Exception:  # e.g. an integer op torch refuses on a dtype: the kernel will say so
        return None


def _cast_to_result(op: OpInfo, fn: Callable[..., torch.Tensor], n: int) -> Kernel:
    """`fn`, followed by a cast to the PIR result dtype only where torch would give another."""
    want = op.out_dtype(0)
    got = _probe_dtype(op, fn, n)
    if want is None or got is None or got == want:
        return fn
    if n == 1:
        return lambda x: fn(x).to(want)
    if n == 2:
        return lambda x, y: fn(x, y).to(want)
    return lambda *xs: fn(*xs).to(want)


# -- unary ----------------------------------------------------------------------------------
_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "pd_op.rsqrt": torch.rsqrt,
    "pd_op.sqrt": torch.sqrt,
    "pd_op.exp": torch.exp,
    "pd_op.log": torch.log,
    "pd_op.abs": torch.abs,
    "pd_op.sigmoid": torch.sigmoid,
    "pd_op.silu": F.silu,
    "pd_op.tanh": torch.tanh,
    "pd_op.relu": torch.relu,
    "pd_op.erf": torch.erf,
    "pd_op.sin": torch.sin,
    "pd_op.cos": torch.cos,
    "pd_op.floor": torch.floor,
    "pd_op.ceil": torch.ceil,
    "pd_op.square": torch.square,
    "pd_op.reciprocal": torch.reciprocal,
    "pd_op.sign": torch.sign,
    "pd_op.logical_not": torch.logical_not,
    "pd_op.isnan": torch.isnan,
    "pd_op.isinf": torch.isinf,
    "pd_op.isfinite": torch.isfinite,
}


@lowering(*_UNARY)
def _unary(op: OpInfo) -> Kernel:
    return _cast_to_result(op, _UNARY[op.name], 1)


@lowering("pd_op.gelu")
def _gelu(op: OpInfo) -> Kernel:
    approximate = "tanh" if op.attr("approximate") else "none"
    return lambda x: F.gelu(x, approximate=approximate)


@lowering("pd_op.leaky_relu")
def _leaky_relu(op: OpInfo) -> Kernel:
    slope = float(op.attr("negative_slope"))
    return lambda x: F.leaky_relu(x, slope)


# -- binary ---------------------------------------------------------------------------------
def _int_divide(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.div(x, y, rounding_mode="trunc")  # C++ integer division, as Paddle's kernel


def _floor_divide(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.div(x, y, rounding_mode="floor")


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "pd_op.add": torch.add,
    "pd_op.subtract": torch.sub,
    "pd_op.multiply": torch.mul,
    "pd_op.divide": torch.div,
    "pd_op.floor_divide": _floor_divide,
    "pd_op.remainder": torch.remainder,
    "pd_op.maximum": torch.maximum,
    "pd_op.minimum": torch.minimum,
    "pd_op.elementwise_pow": torch.pow,
    "pd_op.equal": torch.eq,
    "pd_op.not_equal": torch.ne,
    "pd_op.less_than": torch.lt,
    "pd_op.less_equal": torch.le,
    "pd_op.greater_than": torch.gt,
    "pd_op.greater_equal": torch.ge,
    "pd_op.logical_and": torch.logical_and,
    "pd_op.logical_or": torch.logical_or,
    "pd_op.logical_xor": torch.logical_xor,
    "pd_op.bitwise_and": torch.bitwise_and,
    "pd_op.bitwise_or": torch.bitwise_or,
    "pd_op.bitwise_xor": torch.bitwise_xor,
}


@lowering(*_BINARY)
def _binary(op: OpInfo) -> Kernel:
    fn = _BINARY[op.name]
    if op.name == "pd_op.divide" and all(
            (d := op.in_dtype(i)) is not None and is_integral(d) for i in (0, 1)):
        fn = _int_divide
    return _cast_to_result(op, fn, 2)


@lowering("pd_op.where")
def _where(op: OpInfo) -> Kernel:
    return _cast_to_result(op, torch.where, 3)


# -- scale, pow, cast, clip -----------------------------------------------------------------
def _scalar_for(dtype: torch.dtype | None, value: Any) -> Any:
    """A Paddle Scalar attribute as the kernel of a `dtype` tensor uses it (``scale.to<T>()``:
    truncated toward zero for integers)."""
    if dtype is not None and is_integral(dtype):
        return int(value)
    if dtype is torch.bool:
        return bool(value)
    return float(value)


@lowering("pd_op.scale")
def _scale(op: OpInfo) -> Kernel:
    dtype = op.in_dtype(0)
    bias = _scalar_for(dtype, op.attr("bias"))
    after = bool(op.attr("bias_after_scale"))
    scale = op.bake_scalar(1) if op.has_operand(1) else op.attr("scale", None)
    if scale is not None:
        s = _scalar_for(dtype, scale)
        if s == 1 and bias == 0:
            return lambda x, _s=None: x
        if bias == 0:
            return lambda x, _s=None: x * s
        if after:
            return lambda x, _s=None: x * s + bias
        return lambda x, _s=None: (x + bias) * s

    # a scale computed at run time: a tensor on the op's device (no host read)
    def scaled(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.to(x.dtype).reshape(())
        return x * s + bias if after else (x + bias) * s

    return scaled


@lowering("pd_op.pow")
def _pow(op: OpInfo) -> Kernel:
    factor = _scalar_for(op.in_dtype(0), op.attr("y"))
    if factor == 1:
        return lambda x: x
    return lambda x: torch.pow(x, factor)


@lowering("pd_op.cast")
def _cast(op: OpInfo) -> Kernel:
    dtype = op.dtype_attr("dtype")
    return lambda x: x.to(dtype)


@lowering("pd_op.clip")
def _clip(op: OpInfo) -> Kernel:
    dtype = op.in_dtype(0)
    lo, hi = op.bake_scalar(1), op.bake_scalar(2)
    lo = None if lo is None else _scalar_for(dtype, lo)
    hi = None if hi is None else _scalar_for(dtype, hi)
    if lo is not None and hi is not None:
        return lambda x, _lo=None, _hi=None: torch.clamp(x, lo, hi)

    def clip(x: torch.Tensor, lo_t: Any, hi_t: Any) -> torch.Tensor:
        return torch.clamp(x, lo if lo_t is None else lo_t.to(x.dtype).reshape(()),
                           hi if hi_t is None else hi_t.to(x.dtype).reshape(()))

    return clip
