"""Lowerings of ops that make tensors: ``full``, ``full_int_array``, ``assign_value``,
``full_like``, ``full_with_tensor``, ``arange``, ``assign``.

``full``, ``full_int_array`` and ``assign_value`` have no operands, so lower_program computes
them once at lower time (as every op whose operands are all constants); the kernels here are
what it calls then. A value attribute is converted the way Paddle's kernel converts its Scalar
for the dtype (truncated toward zero for integers).
"""

from __future__ import annotations

from typing import Any

import torch

from graphopt.runtime.lowering.convert import is_integral
from graphopt.runtime.lowering.registry import (
    Kernel,
    OpInfo,
    host_ints,
    host_scalar,
    lowering,
)


def _as_dtype(value: Any, dtype: torch.dtype) -> Any:
    if dtype is torch.bool:
        return bool(value)
    if is_integral(dtype):
        return int(value)
    return float(value) if not isinstance(value, complex) else value


@lowering("pd_op.full")
def _full(op: OpInfo) -> Kernel:
    dtype = op.dtype_attr("dtype")
    shape = [int(s) for s in op.attr("shape")]
    value = _as_dtype(op.attr("value"), dtype)
    device = op.device
    return lambda: torch.full(shape, value, dtype=dtype, device=device)


@lowering("pd_op.full_int_array")
def _full_int_array(op: OpInfo) -> Kernel:
    dtype = op.dtype_attr("dtype")
    values = [int(v) for v in op.attr("value")]
    device = op.device
    return lambda: torch.tensor(values, dtype=dtype, device=device)


@lowering("pd_op.assign_value", "pd_op.assign_value_")
def _assign_value(op: OpInfo) -> Kernel:
    # `assign_value_` writes the values into its operand (a fresh buffer): lowered as a new
    # tensor, which lower_program allows only when nothing reads that buffer afterwards
    dtype = op.dtype_attr("dtype")
    shape = [int(s) for s in op.attr("shape")]
    values = [_as_dtype(v, dtype) for v in op.attr("values")]
    device = op.device
    return lambda *_buffer: torch.tensor(values, dtype=dtype, device=device).reshape(shape)


def _fill_dtype(op: OpInfo) -> torch.dtype:
    dtype = op.dtype_attr("dtype")
    return dtype if dtype is not None else (op.out_dtype(0) or torch.float32)


@lowering("pd_op.full_like", meta_operands=(0,))
def _full_like(op: OpInfo) -> Kernel:
    dtype = _fill_dtype(op)
    device = op.device
    value = op.bake_scalar(1)
    if value is not None:
        v = _as_dtype(value, dtype)
        return lambda x, _v=None: torch.full(x.shape, v, dtype=dtype, device=device)

    # a fill value computed at run time: copied in on the device, never read on the host
    def full_like(x: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape, dtype=dtype, device=device).copy_(vt.reshape(()))

    return full_like


@lowering("pd_op.full_with_tensor", host_operands=(1,))
def _full_with_tensor(op: OpInfo) -> Kernel:
    dtype = _fill_dtype(op)
    device = op.device
    value = op.bake_scalar(0)
    shape = op.bake_ints(1)
    if value is not None:
        v = _as_dtype(value, dtype)
        if shape is not None:
            return lambda _v=None, _s=None: torch.full(shape, v, dtype=dtype, device=device)
        return lambda _v, s: torch.full(host_ints(s), v, dtype=dtype, device=device)

    def full_with_tensor(vt: torch.Tensor, s: Any) -> torch.Tensor:
        size = shape if shape is not None else host_ints(s)
        return torch.empty(size, dtype=dtype, device=device).copy_(vt.reshape(()))

    return full_with_tensor


@lowering("pd_op.arange", host_operands=(0, 1, 2))
def _arange(op: OpInfo) -> Kernel:
    dtype = _fill_dtype(op)
    device = op.device
    bounds = [op.bake_scalar(i) for i in range(3)]

    def arange(*ts: Any) -> torch.Tensor:
        # Paddle's kernel reads start/end/step as the output type (truncated for integers)
        s, e, st = (_as_dtype(b if b is not None else host_scalar(t), dtype)
                    for b, t in zip(bounds, ts, strict=True))
        return torch.arange(s, e, st, dtype=dtype, device=device)

    return arange


@lowering("pd_op.assign")
def _assign(op: OpInfo) -> Kernel:
    # values are never written in place by a lowered program, so sharing is a copy's equal
    return lambda x: x
