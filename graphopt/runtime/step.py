"""Run a segmented program step by step: captured segments through a capture backend, eager
control flow on the host.

One step::

    feeds   <- the tensors the batch holds NOW (arg.<i>, meta.<path>), looked up every step;
               never tensors bound by reference at trace time
    feeds  += host prologue outputs (hoisted.<k>), run eagerly every step
    pad     <- the batch padded to the next capture size (mp.model.pad_batch)
    for each segment, in order:
        captured -> CaptureManager: warm up + capture once per (segment, size), then replay
        eager if -> read the condition on the host, run the chosen branch's segments
        eager    -> run its program as is
    outputs <- [logits[:T], *state]

A batch larger than the largest capture size runs every segment uncaptured (logged, counted in
``eager_fallbacks``). ``run_whole`` runs the unsplit program, for comparisons. Tensors in,
tensors out: every program runs through ``run_program`` (:mod:`graphopt.runtime.executor`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import paddle

from graphopt.errors import ConfigError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import data_ops
from graphopt.ir.segment_plan import CAPTURED, Segment, SegmentPlan
from graphopt.models.base import StepBatch, resolve_meta_field
from graphopt.runtime.backend import Backend, BackendFactory, condition_value, make_backend
from graphopt.runtime.capture import DEFAULT_CAPTURE_SIZES, CaptureCheck, CaptureManager
from graphopt.runtime.executor import RunnerPool, as_tensor

__all__ = ["NO_PLAN", "PreparedStep", "StepExecutor", "StepInputs", "WholeProgramStep",
           "capture_check", "condition_value", "execute_segments", "run_plan"]

#: why a step executor cannot run a ModelProgram without a plan (the runtime only executes)
NO_PLAN = ("no segment plan: the runtime executes a plan a pass made; add piecewise-split to "
           "the pipeline (e.g. pipeline=cudagraph)")

#: runs one segment: (segment, inputs by its feed names) -> its live-out values
SegmentFn = Callable[[Segment, Mapping[str, Any]], list[Any]]


def capture_check(check: CaptureCheck | bool | None) -> CaptureCheck | None:
    """``check_captures`` as given to an executor: True means the default CaptureCheck."""
    if check is True:
        return CaptureCheck()
    return check or None


class _Env(dict):
    """Value key -> tensor for one step; weights (``param:*``) and ``const.<k>`` buffers resolve
    from the parameters."""

    def __init__(self, feeds: Mapping[str, Any], params: Mapping[str, Any]):
        super().__init__(feeds)
        self.params = params

    def get_value(self, key: str) -> Any:
        if key in self:
            return self[key]
        if key.startswith("param:"):
            return self.params[key[len("param:"):]]
        if key in self.params:  # `const.<k>` feeds: model buffers whose values live with weights
            return self.params[key]
        raise KeyError(f"value {key} is needed before any segment produced it")


def execute_segments(
    segments: Sequence[Segment],
    env: _Env,
    run_segment: SegmentFn,
    on_branch: Callable[[Segment, str], None] | None = None,
    release: Mapping[int, Sequence[str]] | None = None,
    condition: Callable[[Any], bool] = condition_value,
) -> None:
    """Run `segments` in order into `env` (eager ifs pick their branch from `env`, read on the
    host by `condition`).

    `release` (:meth:`SegmentPlan.release_schedule`) names, per segment id, the values to drop
    from `env` once that segment has run.
    """
    for seg in segments:
        if seg.is_branching:
            label = "true" if condition(env.get_value(seg.cond)) else "false"
            if on_branch is not None:
                on_branch(seg, label)
            execute_segments(seg.branches[label], env, run_segment, on_branch, release,
                             condition)
            for res, src in zip(seg.results, seg.yields[label], strict=True):
                env[res] = env.get_value(src)
        else:
            feeds = {name: env.get_value(key) for name, key in zip(seg.feed_names, seg.live_in,
                                                                     strict=True)}
            outs = run_segment(seg, feeds)
            env.update(zip(seg.live_out, outs, strict=True))
        if release is not None:
            for key in release.get(seg.id, ()):
                env.pop(key, None)


def run_plan(
    plan: SegmentPlan,
    params: Mapping[str, Any],
    feeds: Mapping[str, Any],
    pool: RunnerPool | None = None,
) -> list[paddle.Tensor]:
    """Run every segment of `plan` uncaptured, in order; return the program's outputs.

    The reference semantics of a plan: equal to running the whole program on `feeds`.
    """
    pool = pool if pool is not None else RunnerPool(params)

    def run_one(seg: Segment, seg_feeds: Mapping[str, Any]) -> list[paddle.Tensor]:
        return pool.get(seg.program).run(seg_feeds)

    env = _Env({k: as_tensor(v) for k, v in feeds.items()}, pool.params)
    execute_segments(plan.segments, env, run_one, release=plan.release_schedule())
    return [as_tensor(env.get_value(k)) for k in plan.outputs]


def plan_programs(mp: ModelProgram) -> list[paddle.pir.Program]:
    """Every program a step of `mp` may run: the whole program, the prologue, each segment
    (branch segments included) and each variant with its segments."""
    out = [p for p in (mp.program, mp.prologue.program if mp.prologue else None) if p]
    plans = [mp.segments] + [v.segments for v in mp.variants]
    out += [v.program for v in mp.variants if v.segments is None]
    for plan in plans:
        if plan is not None:
            out += [s.program for s in plan.walk() if s.program is not None]
    return out


class StepInputs:
    """The inputs of one step of a ModelProgram: the tensors the batch holds now (``arg.<i>``,
    ``meta.<path>``), looked up afresh every step and moved into the backend's memory (host
    inputs stay on the host), and the host prologue's outputs (``hoisted.<k>``), run every step.
    """

    def __init__(self, mp: ModelProgram, pool: RunnerPool | None = None,
                 backend: Backend | None = None) -> None:
        if mp.program is None:
            raise ConfigError("no program to run: the step is several SOT graphs")
        self.mp = mp
        self.pool = pool if pool is not None else RunnerPool(mp.params)
        self.backend = backend if backend is not None else make_backend("none", self.pool)
        self.params = self.backend.params
        self.backend.check_programs(plan_programs(mp))
        names = list(data_ops(mp.program))
        if mp.prologue is not None:
            names += [n for n in data_ops(mp.prologue.program) if n not in names]
        hoisted = set(mp.prologue.outputs) if mp.prologue is not None else set()
        self.names = [n for n in names if n not in hoisted]
        host = set(mp.model.host_inputs) | {f"meta.{h}" for h in mp.model.host_inputs}
        #: (name, shape, dtype) -> what the backend made of that input last step
        self._staged: dict[tuple[str, tuple[int, ...], Any], Any] = {}
        # where each input comes from, decided once: (name, arg index or meta path, host)
        self._args: list[tuple[str, int, bool]] = []
        self._meta: list[tuple[str, str, bool]] = []
        for name in self.names:
            head, _, rest = name.partition(".")
            if head == "arg":
                self._args.append((name, int(rest), name in host))
            elif head == "meta":
                self._meta.append((name, rest, name in host))
            elif name not in self.params:  # `const.<k>`: a model buffer, fed by the runners
                raise ConfigError(f"program input {name!r} has no source: expected arg.<i>, "
                                  "meta.<field> or a hoisted.<k> fed by the host prologue")

    def _stage(self, name: str, value: paddle.Tensor, host: bool) -> Any:
        key = (name, tuple(value.shape), value.dtype)
        staged = self.backend.from_step(value, host, self._staged.get(key))
        self._staged[key] = staged
        return staged

    def __call__(self, batch: StepBatch) -> dict[str, Any]:
        """The step's feeds. A backend may stage inputs in buffers it reuses from step to step
        (see Backend.from_step): feeds are valid until this object makes the next step's."""
        feeds: dict[str, Any] = {name: self._stage(name, as_tensor(batch.args[i]), h)
                                 for name, i, h in self._args}
        for name, path, h in self._meta:
            feeds[name] = self._stage(name, as_tensor(resolve_meta_field(batch.meta, path)), h)
        prologue = self.mp.prologue
        if prologue is not None:
            outs = self.backend.run_program(prologue.program, feeds)
            feeds.update(zip(prologue.outputs, outs, strict=True))
        return feeds


class WholeProgramStep:
    """Runs the unsplit program of a ModelProgram, one call per step (no capture): through
    Paddle's ``run_program`` by default, or through `backend`."""

    def __init__(self, mp: ModelProgram, pool: RunnerPool | None = None,
                 backend: str | Backend | None = None) -> None:
        pool = pool if pool is not None else RunnerPool(mp.params)
        self.backend = make_backend(backend or "none", pool)
        self.inputs = StepInputs(mp, pool, self.backend)
        self.program = mp.program

    def run(self, batch: StepBatch) -> list[Any]:
        return self.execute(self.inputs(batch))

    def execute(self, feeds: Mapping[str, Any]) -> list[Any]:
        """Run on inputs already in the backend's memory (see :meth:`StepInputs.__call__`)."""
        return self.backend.run_program(self.program, feeds)


@dataclass
class PreparedStep:
    """A step's inputs in the backend's memory, padded to its capture size: what
    :meth:`StepExecutor.execute` runs (a benchmark prepares once and times the execution)."""

    feeds: dict[str, Any]
    num_tokens: int
    #: the capture size the batch was padded to (None: it runs uncaptured, unpadded)
    size: int | None


class StepExecutor:
    """Runs one decoder step of a segmented ModelProgram (see the module docstring).

    ``backend``: a registered backend name (:func:`graphopt.runtime.backend.backend_names`:
    ``emulator``, ``none``, ``torch_cpu``, ``torch_cuda``, ...) or a Backend. With a capturing
    backend and ``capture`` (the default), captured segments become graphs per capture size;
    otherwise every segment runs uncaptured and the batch is not padded. ``check_captures``
    (a :class:`CaptureCheck`, or True for the default one) compares replays with uncaptured
    runs. ``stats()`` returns the counters: graphs captured, replays, warm-up runs, eager
    fallbacks (+ reasons), steps, eager segment runs.
    """

    def __init__(
        self,
        mp: ModelProgram,
        backend: str | Backend = "emulator",
        capture_sizes: Sequence[int] = DEFAULT_CAPTURE_SIZES,
        num_warmups: int = 1,
        pool: RunnerPool | None = None,
        *,
        check_captures: CaptureCheck | bool | None = None,
        capture: bool = True,
        backend_factory: BackendFactory = make_backend,
    ) -> None:
        if mp.segments is None:
            raise ConfigError(NO_PLAN)
        self.mp = mp
        self.plan: SegmentPlan = mp.segments
        pool = pool if pool is not None else RunnerPool(mp.params)
        self.backend = backend_factory(backend, pool)
        self.backend_name = self.backend.name
        self.feeds = StepInputs(mp, pool, self.backend)
        self.pool = pool
        self.params = self.backend.params
        self.capture = (CaptureManager(self.backend, list(capture_sizes), num_warmups,
                                       check=capture_check(check_captures))
                        if capture and self.backend.captures else None)
        if self.capture is not None:
            self.backend.note_plan(self.plan)
        self._release = self.plan.release_schedule()
        self._whole: WholeProgramStep | None = None
        self.steps = 0
        self.eager_segment_runs = 0
        self.branches_taken: dict[str, int] = {"true": 0, "false": 0}

    # -- running -------------------------------------------------------------------------------
    def _run_eager(self, seg: Segment, feeds: Mapping[str, Any]) -> list[Any]:
        self.eager_segment_runs += 1
        return self.backend.run_program(seg.program, feeds)

    def _note_branch(self, seg: Segment, label: str) -> None:
        self.branches_taken[label] += 1

    def prepare(self, batch: StepBatch) -> PreparedStep:
        """The step's inputs in the backend's memory, the batch padded to its capture size."""
        num_tokens = batch.num_tokens
        size = self.capture.size_for(num_tokens) if self.capture is not None else None
        if self.capture is not None and size is None:
            self.capture.note_fallback(
                f"batch of {num_tokens} tokens exceeds the largest capture size "
                f"{self.capture.sizes[-1]}"
            )
        padded = batch if size is None or size == num_tokens else \
            self.mp.model.pad_batch(batch, size)
        return PreparedStep(self.feeds(padded), num_tokens, size)

    def run(self, batch: StepBatch) -> list[Any]:
        """One step: ``[logits, *new_state]`` with logits cut back to the batch's tokens.

        The new state is returned, not written back: commit it with
        ``mp.model.commit_state(outs[1:])`` when the step is real.
        """
        return self.execute(self.prepare(batch))

    def execute(self, step: PreparedStep) -> list[Any]:
        """Run a prepared step (see :meth:`run`)."""
        self.steps += 1
        env = _Env(step.feeds, self.params)
        size = step.size
        if size is None:
            execute_segments(self.plan.segments, env, self._run_eager, self._note_branch,
                             self._release, self.backend.condition)
            return [env.get_value(k) for k in self.plan.outputs]
        capture = self.capture
        assert capture is not None

        def run_one(seg: Segment, seg_feeds: Mapping[str, Any]) -> list[Any]:
            if seg.kind == CAPTURED:
                return capture.run(seg, size, seg_feeds)
            return self._run_eager(seg, seg_feeds)

        execute_segments(self.plan.segments, env, run_one, self._note_branch, self._release,
                         self.backend.condition)
        outs = [env.get_value(k) for k in self.plan.outputs]
        if outs and size != step.num_tokens:
            outs[0] = outs[0][:step.num_tokens]  # logits rows; state tensors are full-size
        return outs

    def run_whole(self, batch: StepBatch) -> list[Any]:
        """Run the unsplit ``mp.program`` in one call (reference for comparisons)."""
        if self._whole is None:
            self._whole = WholeProgramStep(self.mp, self.pool, self.backend)
        return self._whole.run(batch)

    def stats(self) -> dict[str, Any]:
        """Counters so far: graphs captured, replays, warm-ups, eager fallbacks (+ reasons),
        steps, eager segment runs, branches taken."""
        out: dict[str, Any] = {
            "backend": self.backend_name,
            "steps": self.steps,
            "eager_segment_runs": self.eager_segment_runs,
            "branches_taken": dict(self.branches_taken),
        }
        if self.capture is not None:
            out.update(self.capture.stats.to_dict())
            out["capture_sizes"] = list(self.capture.sizes)
            out["static_input_bytes"] = self.capture.static_input_bytes()
        else:
            out.update({"graphs_captured": 0, "replays": 0, "warmup_runs": 0,
                        "eager_fallbacks": 0})
        return out
