"""The PIR -> PyTorch lowering (graphopt.runtime.lowering) against Paddle, on real data.

1. every op kind of the 4-layer dsv3 and tiny programs, op by op: each op fed the operand
   values Paddle computed, its results compared with Paddle's (exact for integers and bools),
   constants baked in and read at run time; one-op programs for attribute cases the models do
   not exercise (transpose flags, negative axes, integer division, ...);
2. every program and segment of dsv3 (cudagraph and full_graph pipelines, variants and their
   plans included) and tiny, on prefill, decode and mixed batches, lowered == Paddle; the
   seed-shaped control-flow programs (host conditions computed in the program, nested ifs);
3. an op without a lowering: missing_lowerings names it and its file:line, lower_program
   raises one LoweringError line;
4. a planted wrong lowering is caught by the same comparisons.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("GLOG_minloglevel", "2")
torch = pytest.importorskip("torch")

import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from graphopt.config import validate  # noqa: E402
from graphopt.driver import build_and_optimize  # noqa: E402
from graphopt.errors import LoweringError  # noqa: E402
from graphopt.ir.model_program import ModelProgram  # noqa: E402
from graphopt.ir.pir_utils import add_output, data_ops, static_mode, walk_ops  # noqa: E402
from graphopt.runtime.executor import ProgramRunner, RunnerPool, as_tensor  # noqa: E402
from graphopt.runtime.lowering import (  # noqa: E402
    OPS,
    host_inputs_of,
    lower_program,
    missing_lowerings,
    segment_host_inputs,
    to_paddle,
    to_torch,
    value_placement,
)
from graphopt.runtime.lowering.check import (  # noqa: E402
    check_ops,
    check_program,
    compare,
    reference_values,
    run_plan_recording,
)
from graphopt.runtime.lowering.ops_shape import unsqueeze_positions  # noqa: E402
from graphopt.runtime.step import StepInputs  # noqa: E402
from tests import programs as P  # noqa: E402
from tests.conftest import compose_cfg  # noqa: E402

KINDS = ("prefill", "decode", "mixed")
#: every op kind the dsv3 and tiny programs hold outside control flow (the per-op check's
#: list; `if`, `cf.yield`, feeds, weights and outputs are checked by whole programs)
REAL_OP_KINDS = (
    "builtin.combine", "builtin.split", "pd_op.add", "pd_op.arange", "pd_op.cast",
    "pd_op.concat", "pd_op.divide", "pd_op.embedding", "pd_op.full", "pd_op.full_int_array",
    "pd_op.full_like", "pd_op.full_with_tensor", "pd_op.gather", "pd_op.greater_than",
    "pd_op.less_equal", "pd_op.matmul", "pd_op.mean", "pd_op.multiply", "pd_op.one_hot",
    "pd_op.pow", "pd_op.reshape", "pd_op.rsqrt", "pd_op.scale", "pd_op.scatter",
    "pd_op.shape64", "pd_op.sigmoid", "pd_op.silu", "pd_op.slice", "pd_op.softmax",
    "pd_op.split", "pd_op.squeeze", "pd_op.stack", "pd_op.strided_slice", "pd_op.subtract",
    "pd_op.sum", "pd_op.tanh", "pd_op.tile", "pd_op.topk", "pd_op.transpose",
    "pd_op.unsqueeze", "pd_op.where",
)
STRUCTURAL = ("builtin.parameter", "builtin.shadow_output", "cf.yield", "pd_op.data",
              "pd_op.if")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """PyTorch on one thread, as Paddle's CPU kernels run here: on 2 shared cores its OpenMP
    pool otherwise waits on busy cores (measured: a 46k-element isfinite took 37 ms on 2
    threads under load, 0.1 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the real programs, built once ------------------------------------------------------------


@dataclass
class Built:
    """One optimized model and what running it needs, shared by the tests of this file."""

    mp: ModelProgram
    pool: RunnerPool
    tparams: dict[str, Any]
    #: batch kind -> the step's feeds (Paddle tensors, prologue outputs included)
    feeds: dict[str, dict[str, Any]]

    @property
    def host(self) -> list[str]:
        return host_inputs_of(self.mp)


def _build(*overrides: str) -> Built:
    cfg = compose_cfg(*overrides)
    mp, _, _ = build_and_optimize(cfg, validate(cfg), np.random.default_rng(0))
    mp.model.restore_patches(0)
    pool = RunnerPool(mp.params)
    inputs = StepInputs(mp, pool)
    rng = np.random.default_rng(1)
    feeds = {kind: dict(inputs(mp.model.random_batch(rng, kind))) for kind in KINDS}
    tparams = {k: to_torch(v) for k, v in pool.params.items()}
    return Built(mp, pool, tparams, feeds)


@pytest.fixture(scope="module")
def dsv3() -> Built:
    return _build("model=dsv3", "pipeline=full_graph")


@pytest.fixture(scope="module")
def dsv3_cudagraph() -> Built:
    return _build("model=dsv3", "pipeline=cudagraph")


@pytest.fixture(scope="module")
def tiny() -> Built:
    return _build("model=tiny", "pipeline=full_graph")


def _torch_feeds(feeds: dict[str, Any]) -> dict[str, Any]:
    return {k: to_torch(as_tensor(v)) for k, v in feeds.items()}


# -- 1. op by op, real programs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def op_checks(dsv3: Built, tiny: Built) -> dict[str, list]:
    """Op kind -> its checks, on a mixed batch, over programs that hold every op of both models
    outside an `if`: the mixed variant (both attention branches folded in), the general
    program's global block (the `if`s' else-side zeros: shape64, stack, full_with_tensor) and
    the host prologue."""
    by_kind: dict[str, list] = defaultdict(list)
    for b in (dsv3, tiny):
        mixed = next(v for v in b.mp.variants if "mixed" in v.kinds)
        for program in (mixed.program, b.mp.program, b.mp.prologue.program):
            for r in check_ops(program, b.mp.params, b.feeds["mixed"], b.host):
                by_kind[r.op].append(r)
    return by_kind


def test_the_real_programs_hold_these_op_kinds(op_checks, dsv3, dsv3_cudagraph, tiny):
    """A new op kind in the models fails here first (add it to REAL_OP_KINDS and lower it)."""
    assert sorted(op_checks) == sorted(REAL_OP_KINDS)
    kinds = set()
    for b in (dsv3, dsv3_cudagraph, tiny):
        for program in b.mp.programs():
            kinds |= {op.name() for op in walk_ops(program.global_block())}
    assert kinds == set(REAL_OP_KINDS) | set(STRUCTURAL)
    assert all(k in OPS for k in kinds)


@pytest.mark.parametrize("kind", REAL_OP_KINDS)
def test_op_kind_matches_paddle_on_real_data(op_checks, kind):
    checks = op_checks[kind]
    assert checks and not any(c.skipped for c in checks)
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, "\n".join(bad[:10])


# -- 1b. op by op, attribute cases on one-op programs ------------------------------------------

_RNG = np.random.default_rng(7)


def f32(*shape: int) -> np.ndarray:
    return _RNG.standard_normal(shape).astype(np.float32)


def pos32(*shape: int) -> np.ndarray:
    return (np.abs(_RNG.standard_normal(shape)) + 0.1).astype(np.float32)


def ints(lo: int, hi: int, *shape: int, dtype: str = "int64") -> np.ndarray:
    return _RNG.integers(lo, hi, shape).astype(dtype)


def nonzero(lo: int, hi: int, *shape: int) -> np.ndarray:
    x = ints(lo, hi, *shape)
    return np.where(x == 0, 3, x)


def bools(*shape: int) -> np.ndarray:
    return _RNG.random(shape) > 0.5


@dataclass(frozen=True)
class Case:
    """A small program built from `fn` over data inputs holding `inputs`; `op` must be in it."""

    id: str
    op: str
    fn: Callable[..., Any]
    inputs: tuple[np.ndarray, ...]


def _unary(name: str, fn: Callable[..., Any], x: np.ndarray | None = None) -> Case:
    return Case(name.split(".")[1], name, fn, (f32(3, 5) if x is None else x,))


CASES = [
    Case("matmul_transpose_x", "pd_op.matmul",
         lambda x, y: paddle.matmul(x, y, transpose_x=True), (f32(4, 3), f32(4, 5))),
    Case("matmul_transpose_y", "pd_op.matmul",
         lambda x, y: paddle.matmul(x, y, transpose_y=True), (f32(3, 4), f32(5, 4))),
    Case("matmul_transpose_both_batched", "pd_op.matmul",
         lambda x, y: paddle.matmul(x, y, transpose_x=True, transpose_y=True),
         (f32(2, 4, 3), f32(2, 5, 4))),
    Case("matmul_1d_transpose_ignored", "pd_op.matmul",
         lambda x, y: paddle.matmul(x, y, transpose_x=True), (f32(3), f32(3, 2))),
    Case("matmul_broadcast_batch", "pd_op.matmul", paddle.matmul, (f32(2, 1, 3, 4), f32(5, 4, 6))),
    Case("transpose_perm", "pd_op.transpose", lambda x: paddle.transpose(x, [2, 0, 1]),
         (f32(2, 3, 4),)),
    Case("reshape_zero_copies_dim", "pd_op.reshape", lambda x: paddle.reshape(x, [0, -1]),
         (f32(2, 3, 4),)),
    Case("reshape_runtime_shape", "pd_op.reshape",
         lambda x, y: paddle.reshape(x, paddle.shape(y)), (f32(6), f32(2, 3))),
    Case("squeeze_negative_axis", "pd_op.squeeze", lambda x: paddle.squeeze(x, [-1]),
         (f32(1, 3, 1),)),
    Case("squeeze_skips_non_1", "pd_op.squeeze", lambda x: paddle.squeeze(x, [0, 1]),
         (f32(1, 3, 1),)),
    Case("squeeze_all", "pd_op.squeeze", paddle.squeeze, (f32(1, 3, 1),)),
    Case("unsqueeze_several_negative", "pd_op.unsqueeze",
         lambda x: paddle.unsqueeze(x, [0, -1, 2]), (f32(2, 3),)),
    Case("slice_negative_and_clamped", "pd_op.slice",
         lambda x: paddle.slice(x, axes=[1, 2], starts=[-4, 1], ends=[-1, 100]),
         (f32(2, 6, 4),)),
    Case("slice_decrease_axis", "pd_op.slice", lambda x: x[:, 1], (f32(3, 4),)),
    Case("strided_slice_negative_stride", "pd_op.strided_slice", lambda x: x[4:0:-2],
         (f32(6, 3),)),
    Case("strided_slice_reverse", "pd_op.strided_slice", lambda x: x[:, ::-1], (f32(2, 5),)),
    Case("strided_slice_step", "pd_op.strided_slice", lambda x: x[:, 1::2], (f32(2, 7),)),
    Case("concat_negative_axis", "pd_op.concat", lambda x, y: paddle.concat([x, y], axis=-1),
         (f32(2, 3), f32(2, 2))),
    Case("split_inferred_section", "pd_op.split",
         lambda x: paddle.split(x, [2, -1, 3], axis=-1), (f32(2, 7),)),
    Case("split_with_num", "pd_op.split_with_num", lambda x: paddle.split(x, 3, axis=0),
         (f32(6, 2),)),
    Case("stack_negative_axis", "pd_op.stack", lambda x, y: paddle.stack([x, y], axis=-1),
         (f32(2, 3), f32(2, 3))),
    Case("sum_keepdim_negative_axes", "pd_op.sum",
         lambda x: paddle.sum(x, axis=[0, -1], keepdim=True), (f32(2, 3, 4),)),
    Case("sum_int32_all_to_int64", "pd_op.sum", paddle.sum, (ints(-9, 9, 3, 4, dtype="int32"),)),
    Case("sum_bool", "pd_op.sum", lambda x: paddle.sum(x, axis=0), (bools(3, 4),)),
    Case("mean_negative_axis", "pd_op.mean", lambda x: paddle.mean(x, axis=-2), (f32(2, 3, 4),)),
    Case("mean_all", "pd_op.mean", paddle.mean, (f32(2, 3, 4),)),
    Case("mean_int_truncates", "pd_op.mean", lambda x: paddle.mean(x, axis=1),
         (ints(-9, 9, 3, 4),)),
    Case("max_keepdim", "pd_op.max", lambda x: paddle.max(x, axis=1, keepdim=True),
         (f32(2, 3, 4),)),
    Case("min_all", "pd_op.min", paddle.min, (f32(2, 3, 4),)),
    Case("prod_axes", "pd_op.prod", lambda x: paddle.prod(x, axis=[0, 2]), (f32(2, 3, 4),)),
    Case("argmax_keepdim_int32", "pd_op.argmax",
         lambda x: paddle.argmax(x, axis=-1, keepdim=True, dtype="int32"), (f32(3, 4),)),
    Case("argmin_flatten", "pd_op.argmin", paddle.argmin, (f32(3, 4),)),
    Case("cumsum", "pd_op.cumsum", lambda x: paddle.cumsum(x, axis=1), (f32(3, 4),)),
    Case("cumsum_exclusive_reverse", "pd_op.cumsum",
         lambda x: paddle._C_ops.cumsum(x, 1, False, True, True), (f32(3, 4),)),
    Case("softmax_axis_0", "pd_op.softmax", lambda x: F.softmax(x, axis=0), (f32(3, 4),)),
    Case("log_softmax", "pd_op.log_softmax", lambda x: F.log_softmax(x, axis=-1), (f32(3, 4),)),
    Case("topk_smallest_axis_0", "pd_op.topk",
         lambda x: paddle.topk(x, k=2, axis=0, largest=False), (f32(5, 3),)),
    Case("topk_runtime_k", "pd_op.topk",
         lambda x, y: paddle.topk(x, k=paddle.shape(y)[0]), (f32(3, 6), f32(2))),
    Case("gather_axis_1", "pd_op.gather", lambda x, i: paddle.gather(x, i, axis=1),
         (f32(3, 5), ints(0, 5, 4))),
    Case("gather_0d_index", "pd_op.gather", lambda x, i: paddle.gather(x, i, axis=1),
         (f32(3, 5), np.array(2, dtype=np.int64))),
    Case("gather_n1_index", "pd_op.gather", lambda x, i: paddle.gather(x, i),
         (f32(5, 2), ints(0, 5, 3, 1))),
    Case("index_select_negative_axis", "pd_op.index_select",
         lambda x, i: paddle.index_select(x, i, axis=-1), (f32(3, 5), ints(0, 5, 4))),
    Case("scatter_overwrite_duplicates", "pd_op.scatter",
         lambda x, i, u: paddle.scatter(x, i, u, overwrite=True),
         (f32(5, 3), np.array([1, 3, 1, 0]), f32(4, 3))),
    Case("scatter_accumulate", "pd_op.scatter",
         lambda x, i, u: paddle.scatter(x, i, u, overwrite=False),
         (f32(5, 3), np.array([1, 3, 1, 0]), f32(4, 3))),
    Case("embedding_padding_idx", "pd_op.embedding",
         lambda i, w: F.embedding(i, w, padding_idx=2), (ints(0, 6, 3, 4), f32(6, 5))),
    Case("one_hot", "pd_op.one_hot", lambda i: F.one_hot(i, 7), (ints(0, 7, 5),)),
    Case("scale_int_truncates_factors", "pd_op.scale", lambda x: paddle.scale(x, 0.5, 1.7),
         (ints(-9, 9, 6),)),
    Case("scale_int_factor", "pd_op.scale", lambda x: paddle.scale(x, 3.0, -2.0),
         (ints(-9, 9, 6),)),
    Case("scale_bias_before", "pd_op.scale",
         lambda x: paddle.scale(x, 2.0, 0.5, bias_after_scale=False), (f32(3, 4),)),
    Case("pow_int_truncates_factor", "pd_op.pow", lambda x: paddle.pow(x, 2.7), (ints(-5, 5, 6),)),
    Case("pow_float", "pd_op.pow", lambda x: paddle.pow(x, 3.0), (f32(3, 4),)),
    Case("cast_float_to_int_truncates", "pd_op.cast", lambda x: paddle.cast(x * 3, "int32"),
         (f32(3, 4),)),
    Case("cast_float_to_bool", "pd_op.cast", lambda x: paddle.cast(x, "bool"),
         (np.array([0.0, 0.5, -1.0, 0.0], dtype=np.float32),)),
    Case("cast_int_to_float", "pd_op.cast", lambda x: paddle.cast(x, "float32"),
         (ints(-9, 9, 4),)),
    Case("divide_int_truncates", "pd_op.divide", lambda x, y: paddle._C_ops.divide(x, y),
         (ints(-9, 9, 8), nonzero(-4, 4, 8))),
    Case("divide_float", "pd_op.divide", paddle.divide, (f32(3, 4), pos32(3, 4))),
    Case("floor_divide_int", "pd_op.floor_divide", paddle.floor_divide,
         (ints(-9, 9, 8), nonzero(-4, 4, 8))),
    Case("remainder_int", "pd_op.remainder", paddle.remainder,
         (ints(-9, 9, 8), nonzero(-4, 4, 8))),
    Case("remainder_float", "pd_op.remainder", paddle.remainder, (f32(8), pos32(8))),
    Case("elementwise_pow", "pd_op.elementwise_pow", paddle.pow, (pos32(3, 4), f32(3, 4))),
    Case("maximum_broadcast", "pd_op.maximum", paddle.maximum, (f32(3, 4), f32(4))),
    Case("minimum", "pd_op.minimum", paddle.minimum, (f32(3, 4), f32(3, 4))),
    Case("subtract_int", "pd_op.subtract", paddle.subtract, (ints(-9, 9, 4), ints(-9, 9, 4))),
    Case("equal_int", "pd_op.equal", paddle.equal, (ints(0, 3, 6), ints(0, 3, 6))),
    Case("not_equal", "pd_op.not_equal", paddle.not_equal, (ints(0, 3, 6), ints(0, 3, 6))),
    Case("less_than", "pd_op.less_than", paddle.less_than, (f32(6), f32(6))),
    Case("greater_equal", "pd_op.greater_equal", paddle.greater_equal, (ints(0, 3, 6),
                                                                       ints(0, 3, 6))),
    Case("logical_and", "pd_op.logical_and", paddle.logical_and, (bools(6), bools(6))),
    Case("logical_or", "pd_op.logical_or", paddle.logical_or, (bools(6), bools(6))),
    Case("logical_xor", "pd_op.logical_xor", paddle.logical_xor, (bools(6), bools(6))),
    Case("logical_not", "pd_op.logical_not", paddle.logical_not, (bools(6),)),
    Case("bitwise_and", "pd_op.bitwise_and", paddle.bitwise_and, (ints(0, 64, 6),
                                                                   ints(0, 64, 6))),
    Case("bitwise_or", "pd_op.bitwise_or", paddle.bitwise_or, (ints(0, 64, 6), ints(0, 64, 6))),
    Case("bitwise_xor", "pd_op.bitwise_xor", paddle.bitwise_xor, (ints(0, 64, 6),
                                                                   ints(0, 64, 6))),
    Case("where_broadcast", "pd_op.where", paddle.where, (bools(3, 1), f32(3, 4), f32(4))),
    Case("full_like_int_from_float", "pd_op.full_like",
         lambda x: paddle.full_like(x, 3.7, dtype="int32"), (f32(2, 3),)),
    Case("full_runtime_shape", "pd_op.full_with_tensor",
         lambda x: paddle.full([paddle.shape(x)[0], 3], 2.5), (f32(5, 2),)),
    Case("arange_int_from_fractions", "pd_op.arange",
         lambda x: x + paddle.arange(0.5, 5.5, 1.5, dtype="int64"), (ints(0, 9, 5),)),
    Case("arange_float", "pd_op.arange",
         lambda x: x + paddle.arange(0.5, 2.0, 0.25, dtype="float32"), (f32(6),)),
    Case("arange_runtime_end", "pd_op.arange", lambda x: paddle.arange(paddle.shape(x)[0]),
         (f32(5, 2),)),
    Case("tile_fewer_repeats", "pd_op.tile", lambda x: paddle.tile(x, [2]), (f32(2, 3),)),
    Case("tile_more_repeats", "pd_op.tile", lambda x: paddle.tile(x, [2, 1, 2]), (f32(2, 3),)),
    Case("expand_new_dims", "pd_op.expand", lambda x: paddle.expand(x, [2, -1, 4]),
         (f32(3, 1),)),
    Case("flatten_middle", "pd_op.flatten", lambda x: paddle.flatten(x, 1, 2),
         (f32(2, 3, 4, 5),)),
    Case("clip_float", "pd_op.clip", lambda x: paddle.clip(x, -0.5, 0.5), (f32(3, 4),)),
    Case("clip_int", "pd_op.clip", lambda x: paddle.clip(x, -2, 3), (ints(-9, 9, 6),)),
    Case("tril", "pd_op.tril", lambda x: paddle.tril(x, -1), (f32(4, 4),)),
    Case("triu", "pd_op.triu", lambda x: paddle.triu(x, 1), (f32(4, 5),)),
    Case("bmm", "pd_op.bmm", paddle.bmm, (f32(2, 3, 4), f32(2, 4, 5))),
    Case("assign", "pd_op.assign", paddle.assign, (f32(3),)),
    Case("assign_value", "pd_op.assign_value_",
         lambda x: x + paddle.assign(np.array([1.5, 2.0, -3.0], dtype=np.float32)), (f32(3),)),
    Case("shape_int32", "pd_op.shape", paddle._C_ops.shape, (f32(3, 4),)),
    Case("gelu_erf", "pd_op.gelu", F.gelu, (f32(3, 5),)),
    Case("gelu_tanh", "pd_op.gelu", lambda x: F.gelu(x, approximate=True), (f32(3, 5),)),
    Case("leaky_relu", "pd_op.leaky_relu", lambda x: F.leaky_relu(x, 0.1), (f32(3, 5),)),
    _unary("pd_op.exp", paddle.exp),
    _unary("pd_op.log", paddle.log, pos32(3, 5)),
    _unary("pd_op.sqrt", paddle.sqrt, pos32(3, 5)),
    _unary("pd_op.rsqrt", paddle.rsqrt, pos32(3, 5)),
    _unary("pd_op.abs", paddle.abs),
    _unary("pd_op.relu", F.relu),
    _unary("pd_op.erf", paddle.erf),
    _unary("pd_op.sin", paddle.sin),
    _unary("pd_op.cos", paddle.cos),
    _unary("pd_op.floor", paddle.floor),
    _unary("pd_op.ceil", paddle.ceil),
    _unary("pd_op.square", paddle.square),
    _unary("pd_op.reciprocal", paddle.reciprocal, pos32(3, 5)),
    _unary("pd_op.sign", paddle.sign),
    _unary("pd_op.sigmoid", F.sigmoid),
    _unary("pd_op.silu", F.silu),
    _unary("pd_op.tanh", paddle.tanh),
    _unary("pd_op.isnan", paddle.isnan, np.array([0.0, np.nan, np.inf], dtype=np.float32)),
    _unary("pd_op.isinf", paddle.isinf, np.array([0.0, np.nan, -np.inf], dtype=np.float32)),
    _unary("pd_op.isfinite", paddle.isfinite,
           np.array([0.0, np.nan, np.inf], dtype=np.float32)),
]


def build_case(fn: Callable[..., Any], inputs: tuple[np.ndarray, ...]) -> paddle.pir.Program:
    """A program with one data op per input (``x0``, ``x1``...) and `fn`'s results as outputs."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main, paddle.static.Program()):
            xs = [paddle.static.data(f"x{i}", list(a.shape), str(a.dtype))
                  for i, a in enumerate(inputs)]
            outs = fn(*xs)
            for i, out in enumerate(outs if isinstance(outs, (list, tuple)) else [outs]):
                add_output(main, out, f"out{i}")
    return main


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_attribute_case_matches_paddle(case: Case):
    program = build_case(case.fn, case.inputs)
    assert case.op in {op.name() for op in walk_ops(program.global_block())}
    feeds = {f"x{i}": a for i, a in enumerate(case.inputs)}
    checks = check_ops(program, {}, feeds)
    assert any(c.op == case.op for c in checks)
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, "\n".join(bad)
    for ok, _, why in check_program(program, {}, feeds):
        assert ok, why


def test_every_lowering_is_exercised():
    """Each table entry is checked against Paddle somewhere in this file."""
    covered = set(REAL_OP_KINDS) | set(STRUCTURAL) | {c.op for c in CASES}
    # Paddle's Python API emits neither (builtin.split unpacks vectors; assign_value_ is what
    # paddle.assign of an array builds)
    assert sorted(set(OPS) - covered) == ["builtin.slice", "pd_op.assign_value"]


def test_unsqueeze_positions_follow_paddle():
    """Paddle's GetUnsqueezeShape, ported: measured against paddle.unsqueeze for ranks 0-3
    and 1-3 axes (3,692 cases) when written; a few here."""
    assert unsqueeze_positions([0, -1, 2], 2) == [0, 2, 4]
    assert unsqueeze_positions([-1], 0) == [0]
    assert unsqueeze_positions([1, 1], 2) == [1, 2]
    for axes, rank in [([0, -1, 2], 2), ([-1, -1], 1), ([2, 0], 3), ([-3, 1], 2)]:
        x = paddle.zeros([2 + i for i in range(rank)])
        want = list(paddle.unsqueeze(x, axes).shape)
        t = torch.zeros([2 + i for i in range(rank)])
        for p in unsqueeze_positions(axes, rank):
            t = t.unsqueeze(p)
        assert list(t.shape) == want, (axes, rank)


# -- 2. whole programs and every segment --------------------------------------------------------


def _check_outputs(label: str, got: list, want: list, bad: list[str]) -> None:
    assert len(got) == len(want), label
    for n, (g, w) in enumerate(zip(got, want, strict=True)):
        ok, _, why = compare(g, to_torch(as_tensor(w)))
        if not ok:
            bad.append(f"{label} output {n}: {why}")


def _programs_and_segments(b: Built) -> tuple[list[str], dict[str, set[int]]]:
    """Every program of `b` and every segment that runs, lowered and run on each batch kind,
    against Paddle: the mismatches, and the ids of the segments run, per plan."""
    mp, host = b.mp, b.host
    lowered: dict[int, Any] = {}
    findings: list[str] = []

    def lower(program: paddle.pir.Program, host_inputs: list[str]) -> Any:
        hit = lowered.get(id(program))
        if hit is None:
            hit = lowered[id(program)] = lower_program(program, b.tparams,
                                                       host_inputs=host_inputs)
            findings.extend(hit.sync_points + hit.transfers)
            assert hit.feed_names == list(data_ops(program))
        return hit

    plans = [("plan", mp.program, mp.segments)]
    plans += [(f"variant {v.name} plan", v.program, v.segments) for v in mp.variants]
    wholes = [("program", mp.program), ("prologue", mp.prologue.program)]
    wholes += [(f"variant {v.name}", v.program) for v in mp.variants]
    bad: list[str] = []
    ran: dict[str, set[int]] = defaultdict(set)
    for kind in KINDS:
        feeds = b.feeds[kind]
        tfeeds = _torch_feeds(feeds)
        for label, program in wholes:
            want = b.pool.get(program).run(feeds)
            got = lower(program, host).run(tfeeds)
            _check_outputs(f"{kind} {label}", got, want, bad)
        for label, program, plan in plans:
            placement = value_placement(program, host)
            runs, _ = run_plan_recording(plan, mp.params, feeds, b.pool)
            for r in runs:
                seg = r.segment
                ran[label].add(seg.id)
                got = lower(seg.program, segment_host_inputs(seg, placement)).run(
                    _torch_feeds(r.feeds))
                _check_outputs(f"{kind} {label} segment {seg.id}", got, r.outputs, bad)
    assert not findings, findings[:5]  # no sync point, no per-step transfer anywhere
    return bad, ran


@pytest.mark.parametrize("model", ["dsv3", "dsv3_cudagraph", "tiny"])
def test_every_program_and_segment_matches_paddle(model, request):
    b: Built = request.getfixturevalue(model)
    bad, ran = _programs_and_segments(b)
    assert not bad, "\n".join(bad[:10])
    plans = {"plan": b.mp.segments} | {f"variant {v.name} plan": v.segments
                                        for v in b.mp.variants}
    for label, plan in plans.items():  # prefill, decode and mixed take every branch
        with_program = {s.id for s in plan.walk() if s.program is not None}
        assert ran[label] == with_program, label


@pytest.mark.parametrize("hoisted", [False, True])
def test_control_flow_programs_match_paddle(hoisted):
    """The seed-shaped programs: a host condition computed in the program (slice + cast of the
    host input, HOST_RUNTIME) or fed hoisted; and an if nested in a branch."""
    built = P.build_nested_program() if hoisted else P.build_cond_program(layers=2)
    params = {k: torch.from_numpy(v) for k, v in built.params.items()}
    host = list(built.host_inputs) + (built.prologue.outputs if built.prologue else [])
    lowered = lower_program(built.program, params, host_inputs=host)
    assert lowered.sync_points == [] and lowered.transfers == []
    runner = ProgramRunner(built.program, built.params)
    rng = np.random.default_rng(3)
    for max_len in ([6, 6, 0], [6, 0, 6], [6, 6, 6], [6, 0, 0]):
        feeds = P.feeds_for(built, P.make_batch(5, max_len, rng))
        want = runner.run(feeds)
        got = lowered.run({k: to_torch(np.asarray(v)) for k, v in feeds.items()})
        for g, w in zip(got, want, strict=True):
            ok, _, why = compare(g, to_torch(w))
            assert ok, (max_len, why)


# -- placement ----------------------------------------------------------------------------------


def test_shapes_stay_on_the_host_and_nothing_syncs(dsv3):
    mp = dsv3.mp
    placement = value_placement(mp.program, dsv3.host)
    shape_ops = {k.split("@")[0] for k in placement.shapes}
    assert {"pd_op.shape64", "pd_op.slice", "builtin.combine", "pd_op.stack"} <= shape_ops
    full_with_tensor = [k for k in placement.host if k.startswith("pd_op.full_with_tensor")]
    assert full_with_tensor and not any(placement.is_host(k) for k in full_with_tensor)
    lowered = lower_program(mp.program, dsv3.tparams, host_inputs=dsv3.host)
    stats = lowered.stats()
    assert stats["host_ops"] > 0 and stats["folded_constants"] > 0
    assert lowered.sync_points == [] and lowered.transfers == []
    assert set(lowered.host_feeds) == set(dsv3.host)
    assert lowered.output_on_host == [False] * len(lowered.output_on_host)
    prologue = lower_program(mp.prologue.program, dsv3.tparams, host_inputs=dsv3.host)
    assert prologue.output_on_host == [True] * len(mp.prologue.outputs)  # hoisted conditions


def test_a_device_condition_is_a_reported_sync_point(dsv3):
    """Lowered without saying that the hoisted conditions are host values, every `if` reads a
    device value on the host: each is listed with its op and the model's source line."""
    lowered = lower_program(dsv3.mp.program, dsv3.tparams, host_inputs=[])
    ifs = sum(1 for op in dsv3.mp.program.global_block().ops if op.name() == "pd_op.if")
    assert len(lowered.sync_points) == ifs == 8
    assert all(re.match(r"pd_op\.if \[\d+\] at .*\.py:\d+ .*: the condition \(hoisted\.\d\) is a "
                        r"device value read on the host", s) for s in lowered.sync_points)


# -- 3. missing lowerings -----------------------------------------------------------------------


def test_missing_lowering_is_named_with_its_source_line(tiny, monkeypatch):
    monkeypatch.delitem(OPS, "pd_op.tanh")
    missing = missing_lowerings(tiny.mp.program)
    # SOT traced tiny's tanh: its real call stack holds no model frame (only the trace's
    # caller, this test), so there is no location to name rather than a wrong one
    assert missing == [("pd_op.tanh", None)]
    with pytest.raises(LoweringError) as e:
        lower_program(tiny.mp.program, tiny.tparams, host_inputs=tiny.host)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("no PyTorch lowering for pd_op.tanh at an unknown location: backend "
                          "torch_* cannot run this program")


def test_an_op_nobody_lowered_names_this_file():
    program = build_case(lambda x: F.softplus(x), (f32(3),))
    (item,) = missing_lowerings(program)
    assert item[0] == "pd_op.softplus"
    assert re.fullmatch(r"(.*/)?test_torch_lowering\.py:\d+ \(<lambda>\)", item[1]), item
    with pytest.raises(LoweringError, match=r"pd_op\.softplus at .*test_torch_lowering\.py:\d+ "
                                            r".*backend torch_cuda cannot"):
        lower_program(program, {}, backend="torch_cuda")


# -- 4. a planted wrong lowering is caught --------------------------------------------------------


def _fails(check: Callable[[], list[tuple[bool, float, str]]]) -> bool:
    """Whether a whole-program check reports a mismatch (or the wrong kernel raises)."""
    try:
        return not all(ok for ok, _, _ in check())
    except RuntimeError:
        return True


@pytest.mark.parametrize("planted", ["matmul_ignores_transpose_y", "silu_as_relu"])
def test_a_planted_wrong_lowering_fails_the_checks(dsv3, monkeypatch, planted):
    mp = dsv3.mp
    mixed = next(v for v in mp.variants if "mixed" in v.kinds)
    feeds = dsv3.feeds["mixed"]
    if planted == "matmul_ignores_transpose_y":
        target = "pd_op.matmul"
        monkeypatch.setitem(OPS, target, lambda op: torch.matmul)  # transpose flags ignored
    else:
        target = "pd_op.silu"
        monkeypatch.setitem(OPS, target, lambda op: torch.relu)
    # 1: the op-by-op check flags the planted op kind, and only it
    checks = check_ops(mixed.program, mp.params, feeds, dsv3.host)
    wrong = {c.op for c in checks if not c.ok}
    assert wrong == {target}
    # 2: the whole-program check fails
    assert _fails(lambda: check_program(mixed.program, mp.params, feeds, dsv3.host,
                                        torch_params=dsv3.tparams,
                                        runner=dsv3.pool.get(mixed.program)))


# -- conversions and the runtime ------------------------------------------------------------------


def test_to_torch_and_back_share_cpu_memory():
    p = paddle.to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    t = to_torch(p)
    t[0, 0] = 42.0
    assert float(p.numpy()[0, 0]) == 42.0
    back = to_paddle(t)
    t[1, 2] = -1.0
    assert float(back.numpy()[1, 2]) == -1.0
    for dtype in ("bool", "int32", "int64", "float16", "bfloat16", "float32"):
        x = paddle.zeros([2], dtype=dtype)
        assert str(to_torch(x).dtype) == f"torch.{dtype}"
        assert to_paddle(to_torch(x)).dtype == x.dtype
    a = np.arange(4)
    assert to_torch(a).data_ptr() == a.ctypes.data


def test_a_kernel_error_names_the_op_and_feeds_are_checked():
    program = build_case(paddle.matmul, (f32(2, 3), f32(3, 4)))
    lowered = lower_program(program, {})
    assert lowered.feed_names == ["x0", "x1"]
    with pytest.raises(KeyError, match="missing feeds: x1"):
        lowered.run({"x0": torch.zeros(2, 3)})
    with pytest.raises(RuntimeError) as e:
        lowered.run({"x0": torch.zeros(2, 3), "x1": torch.zeros(5, 4)})
    assert any("in the lowered op pd_op.matmul" in n for n in getattr(e.value, "__notes__", []))


def test_reference_values_cover_the_global_block(tiny):
    mixed = next(v for v in tiny.mp.variants if "mixed" in v.kinds)
    index, values = reference_values(mixed.program, tiny.mp.params, tiny.feeds["mixed"])
    keys = [k for p in index.block_ops[()] for k in index.result_keys(p)]
    assert all(k in values for k in keys)
