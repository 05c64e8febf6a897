"""Trace one decoder step through SOT into a PIR program the program-stage passes can read.

SOT (``paddle.jit.to_static(full_graph=False)``) turns the step into one or more compiled
subgraphs; every data-dependent Python ``if`` on a Tensor breaks the graph. We record, from SOT's
own collectors: the subgraphs, the graph breaks with reason and source location,
the compile count and the op count.

When the step is ONE graph, its program is normalised so the runtime owns every input:

* SOT passes tensors reached through objects (the forward-meta) either as ``pd_op.data`` inputs
  or, inside ``capture_control_flow``-marked functions, as ``builtin.parameter`` bound *by
  reference* (``generated_tensor_N``). Replacing such a tensor between steps is silently not
  seen by Paddle (measured on 3.3.1). Both kinds become ``pd_op.data`` named ``meta.<field>`` here, so the runtime
  feeds them by value every step; the by-reference ones are listed in the report. A tensor SOT
  passes both ways (read outside and inside a marked function) becomes ONE feed.
* step arguments become ``arg.<i>``; weights stay parameters, their values go to ``mp.params``.

The data-op -> tensor mapping is exact: SOT calls each compiled graph with the flat tuple of its
input tensors in ``concrete_program.inputs`` order, and we record that call.

Only the program is wanted, not the step's values: each trace is first tried optimistically,
building the one graph without running it and without SOT's rollback snapshots, and made again
the normal way at the first sign that the step is not one graph (:func:`trace_step`).
"""

from __future__ import annotations

import contextlib
import gc
import linecache
import sys
import time
import traceback
import types
from collections.abc import Iterator
from typing import Any

import paddle
from paddle.jit.dy2static import convert_call_func, parameter_recorder, program_translator
from paddle.jit.dy2static.pir_partial_program import replace_run_impl_guard
from paddle.jit.sot.infer_meta import InferMetaCache, LayerInferMetaCache, VariableCreator
from paddle.jit.sot.opcode_translator.executor import executor_cache
from paddle.jit.sot.opcode_translator.executor.executor_cache import OpcodeExecutorCache
from paddle.jit.sot.opcode_translator.executor.function_graph import FunctionGraph
from paddle.jit.sot.opcode_translator.executor.variables import GlobalVariable
from paddle.jit.sot.symbolic import interpreter as sot_interpreter
from paddle.jit.sot.symbolic.compile_cache import CompileSIRCache, FallbackWrapper
from paddle.jit.sot.utils.envs import (
    ENV_SOT_COLLECT_INFO,
    EnvironmentVariableGuard,
    min_graph_size_guard,
)
from paddle.jit.sot.utils.info_collector import InfoCollector, InfoType

from graphopt.errors import TraceError
from graphopt.ir.model_program import GraphBreak, ModelProgram, TraceInfo
from graphopt.ir.pir_utils import (
    add_data_op,
    clone_program_with_mapping,
    op_count,
    release_native_memory,
    remove_dead_code,
)
from graphopt.ir.sources import user_frames
from graphopt.models.base import StepBatch, meta_tensor_fields


@contextlib.contextmanager
def _sot_collectors() -> Iterator[dict]:
    """Collect break reasons + compile counts, and record each compiled graph's first inputs."""
    calls: dict = {"runs": 0, "placeholders": 0}
    original_call = FallbackWrapper.__call__

    def recording_call(self, *args, **kwargs):
        if calls.get("one_graph") and calls["runs"]:
            # a second graph run: the step is not one graph, and Python between the two ran on
            # made-up values; stop here (trace_step traces again the normal way)
            raise _NotOneGraph("the step ran a second graph")
        calls["runs"] += 1
        if id(self) not in calls and args and isinstance(args[0], tuple):
            calls[id(self)] = args[0]
        return original_call(self, *args, **kwargs)

    InfoCollector().clear()
    FallbackWrapper.__call__ = recording_call
    try:
        # MIN_GRAPH_SIZE=0: SOT would otherwise run graphs under 10 ops eagerly; we want them.
        with EnvironmentVariableGuard(
            ENV_SOT_COLLECT_INFO, {"breakgraph_reason": [], "compile_count": []}
        ), min_graph_size_guard(0):
            yield calls
    finally:
        FallbackWrapper.__call__ = original_call


class _YoungCollections:
    """Stands in for the ``gc`` module inside SOT's translator: its ``collect()`` after every
    translation becomes a young-generation collection (see :func:`_cheap_collections`)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)

    @staticmethod
    def collect(generation: int = 0) -> int:
        return gc.collect(0)


@contextlib.contextmanager
def _cheap_collections() -> Iterator[None]:
    """Make SOT's garbage collections cheap for the duration of a trace.

    SOT runs a full ``gc.collect()`` after every translation; on a deep model that walks every
    live object each time (more than half of a 61-layer trace, and more still once earlier
    traces' programs are kept alive on purpose, see :func:`_reset_sot_caches`). Objects that
    exist before the trace are frozen (not walked, never freed by a collection), and SOT's
    collections only look at the youngest generation; cyclic garbage of the translation is
    still found by Python's automatic collections. Nothing is freed that would not have been.
    """
    gc.collect()
    gc.freeze()
    saved = executor_cache.gc
    executor_cache.gc = _YoungCollections()
    try:
        yield
    finally:
        executor_cache.gc = saved
        gc.unfreeze()


def _per_function(compute: Any, *, methods_only: bool = False) -> Any:
    """`compute(func)` answered once per function for the life of the returned wrapper.

    A bound method is a new object at each attribute access; its function is the key. The key
    is kept with the answer, so a recycled id cannot hit. With `methods_only`, other callables
    go straight to `compute`.
    """
    seen: dict[int, tuple[Any, Any]] = {}

    def memoized(func: Any) -> Any:
        if isinstance(func, types.MethodType):
            key = func.__func__
        elif methods_only:
            return compute(func)
        else:
            key = func
        hit = seen.get(id(key))
        if hit is not None and hit[0] is key:
            return hit[1]
        answer = compute(func)
        seen[id(key)] = (key, answer)
        return answer

    return memoized


@contextlib.contextmanager
def _memoized_support_checks() -> Iterator[None]:
    """Answer dy2static's "is this function left as is?" once per function during a trace.

    ``convert_call_func.is_unsupported`` rebuilds the list of every function of a dozen
    built-in modules on each call, and a marked function's body makes thousands of calls
    (about a tenth of an 8-layer trace). Its answer depends only on the function (for a bound
    method: on its function, module and code).
    """
    original = convert_call_func.is_unsupported
    convert_call_func.is_unsupported = _per_function(original)
    try:
        yield
    finally:
        convert_call_func.is_unsupported = original


@contextlib.contextmanager
def _memoized_conversions() -> Iterator[None]:
    """Convert each marked method through dy2static's AST path once per trace, not once per call.

    dy2static caches a conversion under the callable it was given, weakly; a bound method is a
    new object at every attribute access, so the entry dies at once and every call of a marked
    method (61 layers: 613 calls) parses, rewrites and imports the function again. The
    conversion of a method reads only its function (code, globals, closure; the instance is
    bound afterwards by the caller), so it is kept for the trace under that function.
    """
    cache = program_translator._FUNCTION_CACHE
    cache.convert_with_cache = _per_function(cache.convert_with_cache, methods_only=True)
    try:
        yield
    finally:
        del cache.convert_with_cache  # the class's method shows through again


@contextlib.contextmanager
def _remembered_stack_frames() -> Iterator[None]:
    """Paddle records the Python stack of every op it builds (``op_callstack``) by calling
    ``traceback.extract_stack()``, which makes a summary of every frame and stats every source
    file on the stack each time; under SOT the stack is a hundred frames deep and a 61-layer
    step builds tens of thousands of ops. During a trace, the summary of a frame at a given
    (code, line) is made once and reused: the same file, line, function and source text (the
    only difference: a source file edited during the trace shows its old line)."""
    original = traceback.extract_stack
    seen: dict[tuple[Any, int], traceback.FrameSummary] = {}

    def extract_stack(f: Any = None, limit: int | None = None) -> traceback.StackSummary:
        if limit is not None or getattr(sys, "tracebacklimit", None) is not None:
            return original(f if f is not None else sys._getframe().f_back, limit)
        frame = f if f is not None else sys._getframe().f_back
        frames = []
        while frame is not None:
            key = (frame.f_code, frame.f_lineno)
            summary = seen.get(key)
            if summary is None:
                code = frame.f_code
                linecache.lazycache(code.co_filename, frame.f_globals)
                summary = traceback.FrameSummary(code.co_filename, frame.f_lineno, code.co_name)
                seen[key] = summary
            frames.append(summary)
            frame = frame.f_back
        frames.reverse()
        return traceback.StackSummary.from_list(frames)

    traceback.extract_stack = extract_stack
    try:
        yield
    finally:
        traceback.extract_stack = original


def _block_op_count() -> int:
    """SOT's `opnum_in_program`, without building a list of every op of the program."""
    return paddle.static.default_main_program().global_block().num_ops()


@contextlib.contextmanager
def _counted_ops() -> Iterator[None]:
    """SOT counts the ops of the program it builds before every statement it replays; it does so
    by listing them all, which makes building a 14k-op graph quadratic (9 s of a 61-layer
    trace). Paddle's block knows its op count."""
    original = sot_interpreter.opnum_in_program
    sot_interpreter.opnum_in_program = _block_op_count
    try:
        yield
    finally:
        sot_interpreter.opnum_in_program = original


@contextlib.contextmanager
def _placeholder_runs(calls: dict) -> Iterator[None]:
    """Let SOT build and call its graphs, but not run them: each run returns zeros of the
    graph's output shapes and dtypes.

    Only the program is wanted from the trace; running it once compiles an interpreter for the
    whole step (61 layers: 19 s and the largest allocation of the run). The values a graph
    returns matter only when Python code runs after it (a graph break), and then the caller
    traces again with real runs (see :func:`trace_step`). A graph whose output shape is not
    known statically is run.
    """

    def run_impl(real: Any, inputs: Any, parameters: Any, attrs: Any) -> Any:
        values = real.__self__.program.program_attr["fo_values"]
        shapes = [list(v.shape) for v in values]
        if any(d < 0 for shape in shapes for d in shape):
            return real(inputs, parameters, attrs)
        calls["placeholders"] += 1
        return [paddle.zeros(shape, v.dtype) for shape, v in zip(shapes, values, strict=True)]

    with replace_run_impl_guard(run_impl):
        yield


class _NotOneGraph(Exception):
    """A trace that expected the step as one graph ran a second graph, or would write what its
    graph computes into objects that outlive the trace."""


def _writes_outside(graph: FunctionGraph) -> str | None:
    """What, besides returning them, the code SOT generates would do with the graph's outputs:
    write them into a tensor the step was given (in place), or into an attribute, list, dict or
    global that outlives the step. With placeholder runs that would store zeros there (a lazily
    built cache would stay zeros), so such a step is traced normally."""
    for var in graph._inplace_tensors:
        if var.tracker.is_traceable():
            return f"an in-place write to {var.tracker}"
    for var in graph.side_effects.proxy_variables:
        if not (var.tracker.is_traceable() or isinstance(var, GlobalVariable)):
            continue  # made inside the step: SOT writes nothing back
        # lists, dicts and globals record their changes in `proxy`, other objects (a Layer's
        # attributes) in `attr_proxy`: what SOT's restore_side_effects reads
        proxy = getattr(var, "proxy", None) or var.attr_proxy
        if proxy.has_changed:
            return f"a change to {var.tracker}"
    return None


@contextlib.contextmanager
def _graphs_without_side_effects() -> Iterator[None]:
    """Stop the trace before SOT generates the code that calls a graph, if that code would also
    write the graph's outputs anywhere but the step's result (see :func:`_writes_outside`)."""
    original = FunctionGraph.compile_function

    def compile_function(self: FunctionGraph, *args: Any, **kwargs: Any) -> Any:
        write = _writes_outside(self)
        if write is not None:
            raise _NotOneGraph(f"the step's graph has a side effect: {write}")
        return original(self, *args, **kwargs)

    FunctionGraph.compile_function = compile_function
    try:
        yield
    finally:
        FunctionGraph.compile_function = original


#: what FunctionGraph.save_memo returns inside _no_snapshots
_NO_SNAPSHOT = object()


class _SnapshotNeeded(Exception):
    """An inlined call broke during a trace that took no state snapshots."""


@contextlib.contextmanager
def _no_snapshots(calls: dict) -> Iterator[None]:
    """SOT snapshots its whole graph state (the statement list, deep-copied; guards; side effects)
    before every inlined call, to roll back if the call breaks the graph. The state grows with
    the step, so on a 61-layer step the snapshots are quadratic: a third of the trace.

    A rollback only ever precedes a graph break or a fallback, and a trace that expects the step
    as ONE graph is thrown away and redone normally when either happens (:func:`trace_step`).
    So here no snapshot is taken, and a rollback stops the trace instead.
    """
    save, restore = FunctionGraph.save_memo, FunctionGraph.restore_memo

    def save_memo(self: FunctionGraph) -> Any:
        return _NO_SNAPSHOT

    def restore_memo(self: FunctionGraph, memo: Any) -> None:
        if memo is not _NO_SNAPSHOT:
            restore(self, memo)
            return
        calls["snapshot_needed"] = True  # in case SOT turns the error into a fallback
        raise _SnapshotNeeded("an inlined call broke the graph; no snapshot to roll back to")

    FunctionGraph.save_memo, FunctionGraph.restore_memo = save_memo, restore_memo
    try:
        yield
    finally:
        FunctionGraph.save_memo, FunctionGraph.restore_memo = save, restore


#: every compiled SOT graph we made SOT forget; see _reset_sot_caches.
_RETIRED_GRAPHS: list = []


def _reset_sot_caches() -> None:
    """Make SOT translate from scratch, without freeing a program SOT may still point into.

    A fresh translation is needed so each trace reports its own graphs, breaks and compile
    count. But freeing the old programs is unsafe: dy2static's parameter recorder and SOT's
    infer-meta caches map (program hash, id(tensor)) to values inside them, and a later model
    whose objects reuse those addresses crashes inside SOT (seen when two models were traced in
    one process). So the old compiled graphs are kept alive, and the id-keyed maps are emptied.
    """
    _RETIRED_GRAPHS.extend(CompileSIRCache().cache.values())
    OpcodeExecutorCache().clear()
    CompileSIRCache().clear()
    for recorder in vars(parameter_recorder).values():
        if isinstance(recorder, parameter_recorder.ParametersRecorder):
            recorder.params_dict.clear()
            recorder.tensor2value.clear()
    InferMetaCache().clear()
    LayerInferMetaCache().clear()
    # SOT infers shapes in one process-wide program; two models both naming a weight
    # `linear_0.w_0` would clash there. Give each trace a fresh one (the old one stays alive).
    creator = VariableCreator()
    _RETIRED_GRAPHS.append((creator.main_program, creator.startup_program))
    creator.main_program = paddle.static.Program()
    creator.startup_program = paddle.static.Program()
    creator.var_cache.clear()


def _collect_breaks() -> tuple[list[GraphBreak], int]:
    """Every break SOT recorded, each located at its innermost user frame.

    SOT records a break once where it happens and once more for each enclosing inlined call
    (``BreakGraphInlineCallBreak`` ... ``caused by`` ...); the count is SOT's own, the location
    is the deepest user frame of the chain (the function whose control flow broke the graph).
    """
    info = InfoCollector().get_info_dict(InfoType.E2E_INFO)
    breaks: list[GraphBreak] = []
    for item in info.get("BreakGraphReasonInfo", []):
        reason = item.reason
        message = str(reason)
        frames = user_frames(message)
        file, line, func = frames[-1] if frames else ("", -1, "")
        cause = message.strip().splitlines()[-1].strip()
        root = type(reason).__name__
        if "control flow" in cause:
            root = "DataDependencyControlFlowBreak"
        breaks.append(GraphBreak(root, cause, file, line, func))
    # The root record of an inlined break carries no location; the records SOT adds for each
    # enclosing frame right after it do. Attribute it to the next located one.
    for i, b in enumerate(breaks):
        if not b.file:
            nxt = next((n for n in breaks[i + 1 :] if n.file), None)
            if nxt is not None:
                b.file, b.line, b.function = nxt.file, nxt.line, nxt.function
    compiled = [i.code for i in info.get("CompileCountInfo", [])]
    if not breaks:
        # SOT records no reason for a break in the traced (top-level) frame itself, yet splits
        # the step there and compiles a resume function for what follows: count those.
        for code in dict.fromkeys(c for c in compiled if c.co_name.startswith("$resume")):
            func = code.co_name.split("@")[-1].rsplit("_", 1)[0]
            breaks.append(GraphBreak(
                "BreakInTracedFunction",
                "graph broke in the traced function itself (SOT records no reason there)",
                code.co_filename, code.co_firstlineno, func))
    InfoCollector().clear()
    return breaks, len(compiled)


def trace_step(mp: ModelProgram, batch: StepBatch, *, optimistic: bool = True) -> Any:
    """Trace `batch` through SOT; append to ``mp.traces`` and, for a single graph, set
    ``mp.program``. Returns the step's outputs as SOT computed them.

    ``optimistic`` (the default): first try the step as ONE graph, the only case whose program
    is adopted. SOT then builds the graph without running it (its outputs are zeros of the right
    shapes, see :func:`_placeholder_runs`) and without its rollback snapshots
    (:func:`_no_snapshots`). At the first sign that the step is not one graph (a rollback, a
    second graph run), if the code SOT generates would store the graph's outputs anywhere but
    the step's result (:func:`_writes_outside`), or if the attempt fails, the step is traced
    again the normal way, and that trace is the one recorded (``retraced``; its wall time
    includes the attempt).
    """
    if not optimistic:
        return _trace_once(mp, batch, optimistic=False)
    t0 = time.perf_counter()
    traces = len(mp.traces)
    try:
        outs = _trace_once(mp, batch, optimistic=True)
        if "single-graph" in mp.properties:
            return outs
    except Exception:
        pass  # made-up values can fail where real ones do not; the normal trace below decides
    del mp.traces[traces:]
    wasted = time.perf_counter() - t0
    outs = _trace_once(mp, batch, optimistic=False)
    mp.trace.wall_s += wasted
    mp.trace.retraced = True
    return outs


def _trace_once(mp: ModelProgram, batch: StepBatch, *, optimistic: bool) -> Any:
    layer = mp.model.layer
    t_wall = time.perf_counter()
    _reset_sot_caches()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_cheap_collections())
        stack.enter_context(_memoized_support_checks())
        stack.enter_context(_memoized_conversions())
        stack.enter_context(_counted_ops())
        stack.enter_context(_remembered_stack_frames())
        calls = stack.enter_context(_sot_collectors())
        if optimistic:
            calls["one_graph"] = True
            stack.enter_context(_placeholder_runs(calls))
            stack.enter_context(_no_snapshots(calls))
            stack.enter_context(_graphs_without_side_effects())
        static_fn = paddle.jit.to_static(layer.forward, full_graph=False)
        with paddle.no_grad():
            outs = static_fn(*batch.args, batch.meta)
    elapsed = time.perf_counter() - t0
    if calls.get("snapshot_needed"):
        raise TraceError("the step broke during a trace without snapshots")
    # SOT ran its graph(s) once; their interpreters are not needed for what follows (the step's
    # program is copied next) and are the largest thing the trace leaves behind: free them
    # before the copy, so the two are never in memory together
    release_native_memory()
    breaks, compile_count = _collect_breaks()

    graphs = [w for w in CompileSIRCache().cache.values() if w.concrete_program is not None]
    mp.trace = TraceInfo(
        subgraphs=len(graphs),
        graph_runs=calls["runs"],
        graph_breaks=breaks,
        compile_count=compile_count,
        ops=sum(op_count(w.concrete_program.main_program) for w in graphs),
        time_s=elapsed,
        marked=mp.patch_checkpoint(),
        placeholder_runs=calls["placeholders"],
    )
    mp.traces.append(mp.trace)
    mp.trace_batch = batch
    mp.sot_step = static_fn
    mp.properties.add("traced")
    mp.invalidate()
    # one graph run once is the whole step; a graph run several times per step (SOT went back
    # to Python between runs) covers only part of it
    if len(graphs) == 1 and not breaks and calls["runs"] == 1:
        w = graphs[0]
        if id(w) not in calls:
            raise TraceError("SOT compiled one graph but never called it; cannot map its inputs")
        _adopt_program(mp, w, calls[id(w)], batch)
        mp.properties.add("single-graph")
    else:
        mp.program = None
        mp.params = {}
        mp.properties.discard("single-graph")
    mp.trace.wall_s = time.perf_counter() - t_wall
    return outs


def _is_host_tensor(path: str, tensor: paddle.Tensor) -> bool:
    """A meta tensor that lives on the host: named the way FastDeploy names them
    (``max_len_tensor_cpu``, ``seq_lens_this_time_cpu``), or on the CPU in a CUDA build (in a
    CPU build every tensor is on the CPU, so only the name can tell)."""
    if path.rsplit(".", 1)[-1].endswith("_cpu"):
        return True
    return bool(paddle.is_compiled_with_cuda()) and tensor.place.is_cpu_place()


def _adopt_program(mp: ModelProgram, wrapper: Any, inputs: tuple, batch: StepBatch) -> None:
    """Clone SOT's program and rename/convert its inputs (see module docstring)."""
    cp = wrapper.concrete_program
    program, mapping = clone_program_with_mapping(cp.main_program)

    by_id: dict[int, str] = {id(t): f"arg.{i}" for i, t in enumerate(batch.args)}
    meta_fields = meta_tensor_fields(batch.meta)
    by_id.update({id(t): f"meta.{path}" for path, t in meta_fields.items()})

    # 1. pd_op.data inputs, in the order SOT fed them.
    input_values = cp.inputs[0] if cp.inputs and isinstance(cp.inputs[0], list) else cp.inputs
    if len(input_values) != len(inputs):
        raise TraceError(
            f"SOT graph has {len(input_values)} inputs but was called with {len(inputs)}"
        )
    params: dict = {}
    owned = {id(t) for t in (*mp.model.layer.parameters(), *mp.model.layer.buffers())}
    frozen = []
    for value, tensor in zip(input_values, inputs, strict=True):
        name = by_id.get(id(tensor))
        if name is None:
            # A tensor the model holds that is not a parameter (a buffer, e.g. a RoPE table):
            # constant for the step, so its value travels with the weights as a `const.` feed.
            name = f"const.{len([n for n in params if n.startswith('const.')])}"
            params[name] = tensor.detach()
            if id(tensor) not in owned:  # reached some other way: it may well change per step
                frozen.append(f"{name} {list(tensor.shape)} {str(tensor.dtype).split('.')[-1]}")
        op = mapping.look_up(value).get_defining_op()
        op.set_str_attr("name", name)

    # 2. builtin.parameter: weights stay; meta tensors bound by reference become data ops.
    tensors, values = cp.parameters
    by_reference = []
    feeds = {op.attrs()["name"]: op.result(0) for op in program.global_block().ops
             if op.name() == "pd_op.data"}
    for tensor, value in zip(tensors, values, strict=True):
        new_value = mapping.look_up(value)
        op = new_value.get_defining_op()
        pname = op.attrs()["parameter_name"]
        meta_name = by_id.get(id(tensor))
        if meta_name is None:
            params[pname] = tensor.detach()  # shares the model's memory: no copy of weights
            continue
        by_reference.append(meta_name)
        # a tensor read outside a marked function too is already a feed: use that one
        data = feeds.get(meta_name)
        if data is None:
            data = feeds[meta_name] = add_data_op(program, meta_name, list(tensor.shape),
                                                  tensor.dtype)
        new_value.replace_all_uses_with(data)
        program.global_block().remove_op(op)

    # what the step computes and never uses goes before anything reads the program: Paddle's
    # dy2static recomputes an inline if-condition inside both arms of an if that returns, and
    # that dead host work would count as replay hazards inside the branches
    remove_dead_code(program)
    mp.program = program
    mp.params = params
    mp.trace.host_bound_by_reference = sorted(by_reference)
    mp.trace.frozen_inputs = frozen
    mp.host_inputs = [f"meta.{h}" for h in mp.model.host_inputs]
    # placement from the tensors themselves, not only the declaration: a host tensor the model
    # forgot to list would otherwise count as a device value, and its host work on the
    # captured path would not be a hazard (on a GPU it is frozen at capture)
    declared = set(mp.model.host_inputs)
    fed = {op.attrs()["name"] for op in program.global_block().ops if op.name() == "pd_op.data"}
    inferred = sorted(path for path, t in meta_fields.items()
                      if path not in declared and f"meta.{path}" in fed and _is_host_tensor(path, t))
    mp.host_inputs += [f"meta.{path}" for path in inferred]
    mp.trace.inferred_host_inputs = inferred
