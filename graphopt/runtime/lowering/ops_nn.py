"""Lowerings of reductions and network ops: ``sum``/``mean``/``max``/``min``/``prod``,
``argmax``/``argmin``, ``cumsum``, ``matmul``/``bmm``, ``softmax``/``log_softmax``, ``topk``,
``embedding``, ``one_hot``, ``tril``/``triu``.

Paddle's rules kept here: an empty axis list (or ``reduce_all``) reduces every dimension;
``sum`` returns the PIR result dtype (int64 for int32/bool inputs); ``mean`` of integers
truncates; ``matmul`` transposes the last two dims of an operand of rank >= 2 only;
``embedding`` writes zeros for ``padding_idx`` rows in the forward pass (torch only masks the
gradient); ``topk`` breaks ties as Paddle's CPU kernel and torch's do (both partial sorts; the
order among equal values is not promised by either).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from graphopt.runtime.lowering.convert import is_integral
from graphopt.runtime.lowering.registry import (
    Kernel,
    OpInfo,
    host_ints,
    host_scalar,
    lowering,
    normalize_axis,
)


def _dims(axes: list[int], rank: int, reduce_all: bool = False) -> tuple[int, ...]:
    """Reduction dims: every dim for an empty list or `reduce_all` (Paddle's rule)."""
    if reduce_all or not axes:
        return tuple(range(rank))
    return tuple(normalize_axis(a, rank) for a in axes)


def _reduction(op: OpInfo, reduce: Any) -> Kernel:
    """A kernel ``x, axes -> reduce(x, dims, keepdim)`` with the axes baked when constant."""
    rank = op.in_rank(0)
    keepdim = bool(op.attr("keepdim", False))
    reduce_all = bool(op.attr("reduce_all", False))
    # the axes are an operand (a constant full_int_array, or computed); older ops: attribute
    axes = op.bake_ints(1) if op.has_operand(1) else [int(a) for a in op.attr("axis", [])]
    if axes is not None:
        dims = _dims(axes, rank, reduce_all)
        return lambda x, _a=None: reduce(x, dims, keepdim)
    return lambda x, a: reduce(x, _dims(host_ints(a), rank, reduce_all), keepdim)


@lowering("pd_op.sum", host_operands=(1,))
def _sum(op: OpInfo) -> Kernel:
    dtype = op.out_dtype(0)

    def total(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
        if not dims:  # a 0-d input: nothing to reduce, but the dtype still applies
            return x.to(dtype)
        return torch.sum(x, dims, keepdim, dtype=dtype)

    return _reduction(op, total)


@lowering("pd_op.mean", host_operands=(1,))
def _mean(op: OpInfo) -> Kernel:
    integral = is_integral(op.in_dtype(0) or torch.float32)

    def mean(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
        if not dims:
            return x.clone()
        if integral:  # Paddle: the integer sum divided by the count, truncated
            count = 1
            for d in dims:
                count *= x.shape[d]
            return torch.div(torch.sum(x, dims, keepdim), count, rounding_mode="trunc")
        return torch.mean(x, dims, keepdim)

    return _reduction(op, mean)


def _amax(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.amax(x, dims, keepdim) if dims else x.clone()


def _amin(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.amin(x, dims, keepdim) if dims else x.clone()


def _prod(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):  # torch.prod takes one dim at a time
        x = torch.prod(x, d, keepdim)
    return x


@lowering("pd_op.max", host_operands=(1,))
def _max(op: OpInfo) -> Kernel:
    return _reduction(op, _amax)


@lowering("pd_op.min", host_operands=(1,))
def _min(op: OpInfo) -> Kernel:
    return _reduction(op, _amin)


@lowering("pd_op.prod", host_operands=(1,))
def _prod_op(op: OpInfo) -> Kernel:
    return _reduction(op, _prod)


def _arg_reduce(op: OpInfo, fn: Any) -> Kernel:
    rank = op.in_rank(0)
    keepdim = bool(op.attr("keepdims"))
    flatten = bool(op.attr("flatten"))
    dtype = op.dtype_attr("dtype") or torch.int64
    axis = op.bake_scalar(1)

    def arg(x: torch.Tensor, a: Any) -> torch.Tensor:
        if flatten:  # over all elements; keepdims keeps the rank with every size 1
            out = fn(x.reshape(-1), 0)
            return out.reshape((1,) * rank if keepdim else ()).to(dtype)
        d = normalize_axis(int(axis if axis is not None else host_scalar(a)), rank)
        return fn(x, d, keepdim).to(dtype)

    return arg


@lowering("pd_op.argmax", host_operands=(1,))
def _argmax(op: OpInfo) -> Kernel:
    return _arg_reduce(op, torch.argmax)


@lowering("pd_op.argmin", host_operands=(1,))
def _argmin(op: OpInfo) -> Kernel:
    return _arg_reduce(op, torch.argmin)


@lowering("pd_op.cumsum", host_operands=(1,))
def _cumsum(op: OpInfo) -> Kernel:
    rank = op.in_rank(0)
    flatten = bool(op.attr("flatten"))
    exclusive = bool(op.attr("exclusive"))
    reverse = bool(op.attr("reverse"))
    axis = op.bake_scalar(1)

    def cumsum(x: torch.Tensor, a: Any) -> torch.Tensor:
        if flatten:
            x, d = x.reshape(-1), 0
        else:
            d = normalize_axis(int(axis if axis is not None else host_scalar(a)), rank)
        if reverse:
            x = torch.flip(x, (d,))
        out = torch.cumsum(x, d)
        if exclusive:  # shift by one: each element sums the ones before it
            out = out - x
        return torch.flip(out, (d,)) if reverse else out

    return cumsum


@lowering("pd_op.matmul")
def _matmul(op: OpInfo) -> Kernel:
    tx = bool(op.attr("transpose_x")) and op.in_rank(0) >= 2
    ty = bool(op.attr("transpose_y")) and op.in_rank(1) >= 2
    if not tx and not ty:
        return torch.matmul
    if tx and ty:
        return lambda x, y: torch.matmul(x.transpose(-1, -2), y.transpose(-1, -2))
    if tx:
        return lambda x, y: torch.matmul(x.transpose(-1, -2), y)
    return lambda x, y: torch.matmul(x, y.transpose(-1, -2))


@lowering("pd_op.bmm")
def _bmm(op: OpInfo) -> Kernel:
    return torch.bmm


@lowering("pd_op.softmax")
def _softmax(op: OpInfo) -> Kernel:
    axis = int(op.attr("axis"))
    return lambda x: torch.softmax(x, axis)


@lowering("pd_op.log_softmax")
def _log_softmax(op: OpInfo) -> Kernel:
    axis = int(op.attr("axis"))
    return lambda x: torch.log_softmax(x, axis)


@lowering("pd_op.topk", host_operands=(1,))
def _topk(op: OpInfo) -> Kernel:
    axis = int(op.attr("axis"))
    largest = bool(op.attr("largest"))
    ordered = bool(op.attr("sorted"))
    k = op.bake_scalar(1) if op.has_operand(1) else op.attr("k")
    if k is not None:
        k = int(k)
        return lambda x, _k=None: tuple(torch.topk(x, k, axis, largest, ordered))
    return lambda x, kt: tuple(torch.topk(x, int(host_scalar(kt)), axis, largest, ordered))


@lowering("pd_op.embedding")
def _embedding(op: OpInfo) -> Kernel:
    padding_idx = int(op.attr("padding_idx"))
    if padding_idx == -1:  # Paddle's "no padding" (its Python API maps other negatives first)
        return lambda ids, weight: F.embedding(ids, weight)

    def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, weight)
        return out.masked_fill((ids == padding_idx).unsqueeze(-1), 0)

    return embedding


@lowering("pd_op.one_hot", host_operands=(1,))
def _one_hot(op: OpInfo) -> Kernel:
    dtype = op.out_dtype(0) or torch.float32
    n = op.bake_scalar(1) if op.has_operand(1) else op.attr("num_classes")
    if n is not None:
        classes = int(n)
        return lambda x, _n=None: F.one_hot(x.long(), classes).to(dtype)
    return lambda x, nt: F.one_hot(x.long(), int(host_scalar(nt))).to(dtype)


@lowering("pd_op.tril")
def _tril(op: OpInfo) -> Kernel:
    diagonal = int(op.attr("diagonal"))
    return lambda x: torch.tril(x, diagonal)


@lowering("pd_op.triu")
def _triu(op: OpInfo) -> Kernel:
    diagonal = int(op.attr("diagonal"))
    return lambda x: torch.triu(x, diagonal)
