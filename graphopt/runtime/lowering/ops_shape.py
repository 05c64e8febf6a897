"""Shape and indexing lowerings: packing (``builtin.combine/split/slice``), ``shape64``,
``reshape``, ``squeeze``/``unsqueeze``, ``transpose``, ``slice``/``strided_slice``, ``concat``,
``split``, ``stack``, ``tile``, ``expand``, ``flatten``, ``gather``, ``index_select``,
``scatter``.

Shapes, axes and slice bounds are host data (``host_operands``): baked at lower time when they
are constants, else read from CPU tensors per run. Paddle's rules kept here: ``reshape``'s 0
copies the input's size at that position; ``slice``/``strided_slice`` bounds follow Python's
slicing (measured against Paddle 3.3.1 over all bounds of a 5-element axis, negative strides
included); ``unsqueeze`` with several axes inserts them one after the other, each negative
axis counted against the rank reached so far (Paddle's ``GetUnsqueezeShape``).
"""

from __future__ import annotations

from typing import Any

import torch

from graphopt.runtime.lowering.registry import (
    Kernel,
    OpInfo,
    host_ints,
    host_scalar,
    lowering,
    normalize_axis,
)

# -- packing ------------------------------------------------------------------------------------


@lowering("builtin.combine")
def _combine(op: OpInfo) -> Kernel:
    return lambda *xs: list(xs)


@lowering("builtin.split")
def _builtin_split(op: OpInfo) -> Kernel:
    if op.num_results == 1:
        return lambda xs: xs[0]
    return tuple


@lowering("builtin.slice")
def _builtin_slice(op: OpInfo) -> Kernel:
    index = int(op.attr("index"))
    return lambda xs: xs[index]


# -- shapes -------------------------------------------------------------------------------------


def _shape_kernel(dtype: torch.dtype) -> Kernel:
    # a host tensor made from metadata: no device read, whatever device x is on
    return lambda x: torch.tensor(x.shape, dtype=dtype)


@lowering("pd_op.shape64", meta_operands=(0,))
def _shape64(op: OpInfo) -> Kernel:
    return _shape_kernel(torch.int64)


@lowering("pd_op.shape", meta_operands=(0,))
def _shape(op: OpInfo) -> Kernel:
    return _shape_kernel(op.out_dtype(0) or torch.int32)


def paddle_shape(x: torch.Tensor, shape: list[int]) -> list[int]:
    """Paddle's reshape target: a 0 keeps the input's size at that position (-1 is inferred)."""
    return [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]


@lowering("pd_op.reshape", host_operands=(1,))
def _reshape(op: OpInfo) -> Kernel:
    shape = op.bake_ints(1)
    if shape is not None:
        if 0 not in shape:
            return lambda x, _s=None: x.reshape(shape)
        return lambda x, _s=None: x.reshape(paddle_shape(x, shape))
    return lambda x, s: x.reshape(paddle_shape(x, host_ints(s)))


def _squeeze_dims(axes: list[int], rank: int) -> tuple[int, ...]:
    return tuple(normalize_axis(a, rank) for a in axes)


@lowering("pd_op.squeeze", host_operands=(1,))
def _squeeze(op: OpInfo) -> Kernel:
    rank = op.in_rank(0)
    axes = op.bake_ints(1)
    if axes is not None:
        if not axes:  # Paddle: no axes squeezes every size-1 dimension
            return lambda x, _a=None: x.squeeze()
        dims = _squeeze_dims(axes, rank)
        # torch.squeeze(dims), like Paddle, leaves a named dimension alone unless it is 1
        return lambda x, _a=None: x.squeeze(dims)

    def squeeze(x: torch.Tensor, a: Any) -> torch.Tensor:
        got = host_ints(a)
        return x.squeeze(_squeeze_dims(got, rank)) if got else x.squeeze()

    return squeeze


def unsqueeze_positions(axes: list[int], rank: int) -> list[int]:
    """Where Paddle's ``unsqueeze(x, axes)`` puts the new size-1 dims of a rank-`rank` input,
    in ascending order (a port of ``phi::funcs::GetUnsqueezeShape``: each axis is applied in
    turn, negative ones against the rank reached so far, and earlier new dims move right)."""
    out = [0] * (rank + len(axes))
    cur_rank = rank
    for axis in axes:
        cur = axis + cur_rank + 1 if axis < 0 else axis
        if not 0 <= cur <= cur_rank:
            raise ValueError(f"unsqueeze axis {axis} is out of range for rank {cur_rank}")
        for i in range(cur_rank, cur - 1, -1):
            if out[i] == 1:
                out[i + 1] = 1
                out[i] = 0
        out[cur] = 1
        cur_rank += 1
    return [i for i, marked in enumerate(out) if marked == 1]


def _apply_unsqueeze(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    for p in positions:
        x = x.unsqueeze(p)
    return x


@lowering("pd_op.unsqueeze", host_operands=(1,))
def _unsqueeze(op: OpInfo) -> Kernel:
    rank = op.in_rank(0)
    axes = op.bake_ints(1)
    if axes is not None:
        positions = unsqueeze_positions(axes, rank)
        if len(positions) == 1:
            (p,) = positions
            return lambda x, _a=None: x.unsqueeze(p)
        return lambda x, _a=None: _apply_unsqueeze(x, positions)
    return lambda x, a: _apply_unsqueeze(x, unsqueeze_positions(host_ints(a), rank))


@lowering("pd_op.transpose")
def _transpose(op: OpInfo) -> Kernel:
    perm = [int(p) for p in op.attr("perm")]
    return lambda x: x.permute(perm)


@lowering("pd_op.flatten")
def _flatten(op: OpInfo) -> Kernel:
    rank = op.in_rank(0)
    if rank == 0:  # Paddle flattens a 0-d tensor to shape [1]
        return lambda x: x.reshape(1)
    start = normalize_axis(int(op.attr("start_axis")), rank)
    stop = normalize_axis(int(op.attr("stop_axis")), rank)
    return lambda x: torch.flatten(x, start, stop)


# -- slicing ------------------------------------------------------------------------------------


def _slice_index(rank: int, axes: list[int], starts: list[int], ends: list[int]
                 ) -> tuple[slice, ...]:
    index = [slice(None)] * rank
    for axis, s, e in zip(axes, starts, ends, strict=True):
        index[normalize_axis(axis, rank)] = slice(s, e)
    return tuple(index)


@lowering("pd_op.slice", host_operands=(1, 2))
def _slice(op: OpInfo) -> Kernel:
    rank = op.in_rank(0)
    axes = [int(a) for a in op.attr("axes")]
    decrease = tuple(normalize_axis(int(a), rank) for a in op.attr("decrease_axis"))
    starts, ends = op.bake_ints(1), op.bake_ints(2)

    def finish(y: torch.Tensor) -> torch.Tensor:
        return y.squeeze(decrease) if decrease else y

    if starts is not None and ends is not None:
        index = _slice_index(rank, axes, starts, ends)
        if decrease:
            return lambda x, _s=None, _e=None: x[index].squeeze(decrease)
        return lambda x, _s=None, _e=None: x[index]

    def slice_(x: torch.Tensor, s: Any, e: Any) -> torch.Tensor:
        s_ = starts if starts is not None else host_ints(s)
        e_ = ends if ends is not None else host_ints(e)
        return finish(x[_slice_index(rank, axes, s_, e_)])

    return slice_


def _strided(x: torch.Tensor, axes: list[int], starts: list[int], ends: list[int],
             strides: list[int]) -> torch.Tensor:
    rank = x.dim()
    index: list[Any] = [slice(None)] * rank
    flips = []
    for axis, s, e, st in zip(axes, starts, ends, strides, strict=True):
        a = normalize_axis(axis, rank)
        if st > 0:
            index[a] = slice(s, e, st)
            continue
        # torch has no negative steps: take the same elements ascending, then flip
        picked = range(x.shape[a])[slice(s, e, st)]
        if len(picked) == 0:
            index[a] = slice(0, 0)
        else:
            index[a] = slice(picked[-1], picked[0] + 1, -st)
            flips.append(a)
    y = x[tuple(index)]
    return torch.flip(y, flips) if flips else y


@lowering("pd_op.strided_slice", host_operands=(1, 2, 3))
def _strided_slice(op: OpInfo) -> Kernel:
    rank = op.in_rank(0)
    axes = [int(a) for a in op.attr("axes")]
    starts, ends, strides = op.bake_ints(1), op.bake_ints(2), op.bake_ints(3)
    if starts is not None and ends is not None and strides is not None:
        if all(st > 0 for st in strides):
            index = [slice(None)] * rank
            for axis, s, e, st in zip(axes, starts, ends, strides, strict=True):
                index[normalize_axis(axis, rank)] = slice(s, e, st)
            t_index = tuple(index)
            return lambda x, _s=None, _e=None, _t=None: x[t_index]
        return lambda x, _s=None, _e=None, _t=None: _strided(x, axes, starts, ends, strides)

    def strided(x: torch.Tensor, s: Any, e: Any, t: Any) -> torch.Tensor:
        return _strided(x, axes, starts if starts is not None else host_ints(s),
                        ends if ends is not None else host_ints(e),
                        strides if strides is not None else host_ints(t))

    return strided


# -- joining and splitting ------------------------------------------------------------------------


@lowering("pd_op.concat", host_operands=(1,))
def _concat(op: OpInfo) -> Kernel:
    axis = op.bake_scalar(1)
    if axis is not None:
        dim = int(axis)
        return lambda xs, _a=None: torch.cat(xs, dim)
    return lambda xs, a: torch.cat(xs, int(host_scalar(a)))


@lowering("pd_op.stack")
def _stack(op: OpInfo) -> Kernel:
    axis = int(op.attr("axis"))
    return lambda xs: torch.stack(xs, axis)


def _sections(x: torch.Tensor, dim: int, sections: list[int]) -> list[int]:
    """Paddle's split sections: one -1 takes what the others leave."""
    if -1 not in sections:
        return sections
    known = sum(s for s in sections if s != -1)
    return [x.shape[dim] - known if s == -1 else s for s in sections]


@lowering("pd_op.split", host_operands=(1, 2))
def _split(op: OpInfo) -> Kernel:
    rank = op.in_rank(0)
    sections, axis = op.bake_ints(1), op.bake_scalar(2)
    if sections is not None and axis is not None:
        dim = normalize_axis(int(axis), rank)
        if -1 not in sections:
            return lambda x, _s=None, _a=None: list(torch.split(x, sections, dim))
        return lambda x, _s=None, _a=None: list(torch.split(x, _sections(x, dim, sections), dim))

    def split(x: torch.Tensor, s: Any, a: Any) -> list[torch.Tensor]:
        d = normalize_axis(int(axis if axis is not None else host_scalar(a)), rank)
        secs = sections if sections is not None else host_ints(s)
        return list(torch.split(x, _sections(x, d, secs), d))

    return split


@lowering("pd_op.split_with_num", host_operands=(1,))
def _split_with_num(op: OpInfo) -> Kernel:
    rank = op.in_rank(0)
    num = int(op.attr("num"))
    axis = op.bake_scalar(1)

    def split(x: torch.Tensor, a: Any) -> list[torch.Tensor]:
        d = normalize_axis(int(axis if axis is not None else host_scalar(a)), rank)
        return list(torch.split(x, x.shape[d] // num, d))

    return split


@lowering("pd_op.tile", host_operands=(1,))
def _tile(op: OpInfo) -> Kernel:
    repeats = op.bake_ints(1)
    # torch.tile pads the shorter of shape/repeats with leading 1s, as Paddle's tile does
    if repeats is not None:
        return lambda x, _r=None: torch.tile(x, repeats)
    return lambda x, r: torch.tile(x, host_ints(r))


@lowering("pd_op.expand", host_operands=(1,))
def _expand(op: OpInfo) -> Kernel:
    shape = op.bake_ints(1)
    if shape is not None:
        return lambda x, _s=None: x.expand(shape)
    return lambda x, s: x.expand(host_ints(s))


# -- gather / scatter ---------------------------------------------------------------------------


@lowering("pd_op.gather", host_operands=(2,))
def _gather(op: OpInfo) -> Kernel:
    rank = op.in_rank(0)
    index_rank = op.in_rank(1)
    axis = op.bake_scalar(2) if op.has_operand(2) else op.attr("axis", 0)

    def gather_on(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
        if index_rank == 0:  # Paddle: a 0-d index drops the axis
            return x.index_select(dim, index.reshape(1)).squeeze(dim)
        # Paddle takes an [N, 1] index as [N]
        return x.index_select(dim, index.reshape(-1) if index_rank > 1 else index)

    if axis is not None:
        dim = normalize_axis(int(axis), rank)
        return lambda x, index, _a=None: gather_on(x, index, dim)
    return lambda x, index, a: gather_on(x, index, normalize_axis(int(host_scalar(a)), rank))


@lowering("pd_op.index_select")
def _index_select(op: OpInfo) -> Kernel:
    dim = normalize_axis(int(op.attr("axis")), op.in_rank(0))
    return lambda x, index: x.index_select(dim, index)


@lowering("pd_op.scatter")
def _scatter(op: OpInfo) -> Kernel:
    overwrite = bool(op.attr("overwrite"))
    index_1d = op.in_rank(1) == 0

    def scatter(x: torch.Tensor, index: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        if index_1d:
            index, updates = index.reshape(1), updates.unsqueeze(0)
        if index.dtype != torch.int64:
            index = index.long()
        if overwrite:
            # duplicate indices: the last update wins on the CPU, as in Paddle's CPU kernel
            return torch.index_copy(x, 0, index, updates)
        # Paddle zeroes every indexed row, then adds each update into it
        return x.index_fill(0, index, 0).index_add(0, index, updates)

    return scatter
