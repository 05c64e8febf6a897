"""Lowerings checked against Paddle on real data: op by op, and whole programs.

:func:`check_ops` runs a program through Paddle once with every value of its global block
fetched, then feeds each op's actual operand values into that op's lowering alone
(:func:`~graphopt.runtime.lowering.program.lower_op`) and compares what it returns with what
Paddle computed: exactly for integers and booleans, to a relative tolerance for floats, dtype
and shape always. Each op is checked twice: with its constant operands baked in (as
:func:`lower_program` lowers it) and with every operand read at run time. Ops inside ``if``
blocks are not fetchable: check an if-free program (a variant, a segment) for them.
:func:`check_program` compares a whole lowered program's outputs with Paddle's.

Used by ``tests/test_torch_lowering.py`` and ``tools/lowering_coverage.py --check``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import torch

from graphopt.ir.pir_utils import (
    INTERFACE_OPS,
    add_output,
    clone_program_with_mapping,
    remove_outputs,
    source_location,
)
from graphopt.ir.program_index import ProgramIndex, path_str
from graphopt.ir.segment_plan import Segment, SegmentPlan
from graphopt.runtime.executor import ProgramRunner, RunnerPool, as_tensor
from graphopt.runtime.lowering.convert import to_torch
from graphopt.runtime.lowering.program import _Lowerer, lower_op, lower_program
from graphopt.runtime.lowering.registry import OPS, lowering_flags

#: float tolerance: |got - want| <= RTOL * |want| + ATOL * max|want| (per result tensor)
RTOL = 1e-5
ATOL = 1e-6


@dataclass
class OpCheck:
    """One op compared with Paddle (or why it could not be)."""

    op: str
    path: str
    #: "baked" (constant operands baked in) or "runtime" (every operand read per run)
    mode: str
    ok: bool
    #: largest error relative to the result's scale (0 for exact matches)
    err: float = 0.0
    detail: str = ""
    skipped: bool = False

    def __str__(self) -> str:
        state = "skipped" if self.skipped else ("ok" if self.ok else "MISMATCH")
        return f"{self.op} [{self.path}] ({self.mode}): {state} {self.detail}".rstrip()


def compare(got: Any, want: torch.Tensor, rtol: float = RTOL, atol: float = ATOL
            ) -> tuple[bool, float, str]:
    """``(ok, err, detail)``: `got` (a torch tensor) against `want`: same dtype and shape;
    integers and booleans equal; floats within ``rtol * |want| + atol * max|want|`` (NaN
    where `want` has NaN)."""
    if not isinstance(got, torch.Tensor):
        return False, math.inf, f"got {type(got).__name__}, not a tensor"
    if got.dtype != want.dtype:
        return False, math.inf, f"dtype {got.dtype} != {want.dtype}"
    if tuple(got.shape) != tuple(want.shape):
        return False, math.inf, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return True, 0.0, ""
    got, want = got.detach().cpu(), want.detach().cpu()
    if torch.equal(got, want):  # most ops: bit for bit (and the cheap test)
        return True, 0.0, ""
    if not (want.dtype.is_floating_point or want.dtype.is_complex):
        bad = int((got != want).sum())
        return False, 1.0, f"{bad} elements differ"
    g, w = got.double(), want.double()
    nan_w = torch.isnan(w)
    if not torch.equal(torch.isnan(g), nan_w):
        return False, math.inf, "NaN in different places"
    same = (g == w) | nan_w  # equal values, infinities included, and NaN where Paddle has NaN
    mag = torch.where(torch.isfinite(w), w.abs(), torch.zeros_like(w))
    scale = max(float(mag.max()), 1e-30)
    diff = torch.where(same, torch.zeros_like(g), (g - w).abs())  # inf where one side is inf
    ok = bool((diff <= rtol * mag + atol * scale).all())
    err = float((diff / (mag + scale)).max())
    return ok, err, "" if ok else f"max abs err {float(diff.max()):.3g} (scale {scale:.3g})"


def reference_values(program: paddle.pir.Program, params: Mapping[str, Any],
                     feeds: Mapping[str, Any]) -> tuple[ProgramIndex, dict[str, Any]]:
    """Every value of `program`'s global block as Paddle computes it for `feeds`, by
    ProgramIndex key, as torch tensors (vectors as lists); values in nested blocks are absent."""
    index = ProgramIndex(program)
    values: dict[str, Any] = {}
    # a buffer an in-place op writes into is not fetched (run_program loses it once aliased)
    overwritten = {k for path in index.block_ops[()] if index.ops[path].name().endswith("_")
                   for k in index.operand_keys(path)}
    fetch_keys = []
    for path in index.block_ops[()]:
        op = index.ops[path]
        name = op.name()
        if name in INTERFACE_OPS:
            continue
        for k, v in zip(index.result_keys(path), op.results(), strict=True):
            if not v.is_combine() and v.initialized() and k not in overwritten:
                fetch_keys.append(k)
    for path in index.block_ops[()]:
        op = index.ops[path]
        if op.name() == "pd_op.data":
            name = index.result_keys(path)[0]
            values[name] = to_torch(as_tensor(feeds[name] if name in feeds else params[name]))
        elif op.name() == "builtin.parameter":
            key = index.result_keys(path)[0]
            values[key] = to_torch(as_tensor(params[key[len("param:"):]]))
    # run_program fetches named values only: a copy of the program outputs every value
    copy, mapping = clone_program_with_mapping(program)
    remove_outputs(copy)
    for n, k in enumerate(fetch_keys):
        add_output(copy, mapping.look_up(index.values[k]), f"graphopt.check.{n}")
    outs = ProgramRunner(copy, params, feed_constants=False).run(feeds)
    for k, t in zip(fetch_keys, outs, strict=True):
        values[k] = to_torch(t)
    # vectors: a combine is the list of its operands; a split's vector is what unpacks it
    for path in index.block_ops[()]:
        op = index.ops[path]
        if op.name() == "builtin.combine":
            parts = [values.get(k) for k in index.operand_keys(path)]
            if all(p is not None for p in parts):
                values[index.result_keys(path)[0]] = parts
        elif op.name() == "builtin.split":
            (vec,) = index.operand_keys(path)
            parts = [values.get(k) for k in index.result_keys(path)]
            if vec not in values and all(p is not None for p in parts):
                values[vec] = parts
    return index, values


def check_ops(program: paddle.pir.Program, params: Mapping[str, Any], feeds: Mapping[str, Any],
              host_inputs: Sequence[str] = (), rtol: float = RTOL, atol: float = ATOL
              ) -> list[OpCheck]:
    """Each op of `program`'s global block, lowered alone, against Paddle on `feeds` (see the
    module docstring); one :class:`OpCheck` per op and mode. Feeds and params may be Paddle
    tensors or arrays."""
    index, values = reference_values(program, params, feeds)
    # which operands lower_program treats as constants, and their lower-time values
    lw = _Lowerer(program, {k: to_torch(as_tensor(v)) for k, v in params.items()},
                  torch.device("cpu"), host_inputs)
    lw.lower_block(())
    out: list[OpCheck] = []
    for path in index.block_ops[()]:
        op = index.ops[path]
        name = op.name()
        fn = OPS.get(name)
        if fn is None or lowering_flags(fn)[4]:
            continue
        where = path_str(path)
        operand_keys = index.operand_keys(path)
        result_keys = index.result_keys(path)
        args = [values.get(k, lw.consts.get(k)) for k in operand_keys]
        wants = [values.get(k) for k in result_keys]
        if any(a is None for a in args) or any(w is None for w in wants):
            out.append(OpCheck(name, where, "-", True, skipped=True,
                               detail="an operand or result was not fetched"))
            continue
        consts = {i: lw.consts[k] for i, k in enumerate(operand_keys) if k in lw.consts}
        for mode, c in (("baked", consts), ("runtime", {})):
            if mode == "runtime" and not consts:
                continue
            out.append(_check_one(op, name, where, mode, c, args, wants, rtol, atol))
    return out


def _check_one(op: paddle.pir.Operation, name: str, where: str, mode: str,
               consts: dict[int, Any], args: list[Any], wants: list[Any], rtol: float,
               atol: float) -> OpCheck:
    try:
        got = lower_op(op, consts=consts)(*args)
    except Exception as e:
        return OpCheck(name, where, mode, False, math.inf,
                       f"raised {type(e).__name__}: {e} (at {source_location(op)})")
    if len(got) != len(wants):
        return OpCheck(name, where, mode, False, math.inf,
                       f"{len(got)} results, Paddle has {len(wants)}")
    worst, details = 0.0, []
    ok = True
    for j, (g, w) in enumerate(zip(got, wants, strict=True)):
        pairs = list(zip(g, w, strict=False)) if isinstance(w, list) else [(g, w)]
        if isinstance(w, list) and (not isinstance(g, (list, tuple)) or len(g) != len(w)):
            ok, worst = False, math.inf
            details.append(f"result {j}: vector of {len(w)} expected")
            continue
        for gg, ww in pairs:
            good, err, why = compare(gg, ww, rtol, atol)
            worst = max(worst, err)
            if not good:
                ok = False
                details.append(f"result {j}: {why}")
    return OpCheck(name, where, mode, ok, worst, "; ".join(details))


def check_program(program: paddle.pir.Program, params: Mapping[str, Any],
                  feeds: Mapping[str, Any], host_inputs: Sequence[str] = (),
                  rtol: float = RTOL, atol: float = ATOL,
                  torch_params: Mapping[str, torch.Tensor] | None = None,
                  runner: ProgramRunner | None = None) -> list[tuple[bool, float, str]]:
    """`program` lowered (on the CPU) and run on `feeds`, against Paddle's run: one
    ``compare`` result per output. `torch_params` / `runner` reuse what a caller already
    converted or compiled."""
    tparams = torch_params if torch_params is not None else {
        k: to_torch(as_tensor(v)) for k, v in params.items()}
    lowered = lower_program(program, tparams, host_inputs=host_inputs)
    runner = runner if runner is not None else ProgramRunner(program, params)
    want = runner.run(feeds)
    got = lowered.run({k: to_torch(as_tensor(v)) for k, v in feeds.items()})
    return [compare(g, to_torch(w), rtol, atol) for g, w in zip(got, want, strict=True)]


@dataclass
class SegmentRun:
    """One segment as Paddle ran it in a step: its program, feeds and outputs."""

    segment: Segment
    feeds: dict[str, Any]
    outputs: list[Any]


def run_plan_recording(plan: SegmentPlan, params: Mapping[str, Any],
                       feeds: Mapping[str, Any], pool: RunnerPool | None = None
                       ) -> tuple[list[SegmentRun], list[Any]]:
    """Run `plan` through Paddle, segment by segment (eager ifs decided on the host), keeping
    what each segment that ran was fed and returned; and the plan's outputs."""
    pool = pool if pool is not None else RunnerPool(params)
    env: dict[str, Any] = {k: as_tensor(v) for k, v in feeds.items()}

    def get(key: str) -> Any:
        if key in env:
            return env[key]
        if key.startswith("param:"):
            return pool.params[key[len("param:"):]]
        return pool.params[key]  # `const.<k>`

    runs: list[SegmentRun] = []

    def walk(segments: Sequence[Segment]) -> None:
        for seg in segments:
            if seg.is_branching:
                cond = np.asarray(get(str(seg.cond))).reshape(-1)
                label = "true" if bool(cond[0]) else "false"
                walk(seg.branches[label])
                for res, src in zip(seg.results, seg.yields[label], strict=True):
                    env[res] = get(src)
                continue
            seg_feeds = {name: get(key)
                         for name, key in zip(seg.feed_names, seg.live_in, strict=True)}
            outs = pool.get(seg.program).run(seg_feeds)
            runs.append(SegmentRun(seg, seg_feeds, list(outs)))
            env.update(zip(seg.live_out, outs, strict=True))

    walk(plan.segments)
    return runs, [get(k) for k in plan.outputs]
