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

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import paddle

from graphopt.errors import ConfigError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import data_ops
from graphopt.ir.segment_plan import CAPTURED, Segment, SegmentPlan
from graphopt.models.base import StepBatch, resolve_meta_field
from graphopt.runtime.capture import (
    BACKENDS,
    DEFAULT_CAPTURE_SIZES,
    CaptureManager,
    make_backend,
)
from graphopt.runtime.executor import ProgramRunner, RunnerPool, as_tensor

#: why a step executor cannot run a ModelProgram without a plan (the runtime only executes)
NO_PLAN = ("no segment plan: the runtime executes a plan a pass made; add piecewise-split to "
           "the pipeline (e.g. pipeline=cudagraph)")

#: runs one segment: (segment, inputs by its feed names) -> its live-out values
SegmentFn = Callable[[Segment, Mapping[str, paddle.Tensor]], list[paddle.Tensor]]


def condition_value(cond: Any) -> bool:
    """The host-side truth of an ``if`` condition (a one-element bool tensor)."""
    if cond is None:  # e.g. a fetch that produced nothing: never guess a branch
        raise ValueError("if condition has no value")
    if isinstance(cond, paddle.Tensor):
        if math.prod(cond.shape) != 1:  # (Tensor.size goes through numpy: slow per step)
            raise ValueError(f"if condition must have one element, got shape {list(cond.shape)}")
        return bool(cond.item())
    arr = np.asarray(cond)
    if arr.dtype == object or arr.size != 1:
        raise ValueError(f"if condition must have one element, got shape {list(arr.shape)}")
    return bool(arr.reshape(-1)[0])


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
) -> None:
    """Run `segments` in order into `env` (eager ifs pick their branch from `env`).

    `release` (:meth:`SegmentPlan.release_schedule`) names, per segment id, the values to drop
    from `env` once that segment has run.
    """
    for seg in segments:
        if seg.is_branching:
            label = "true" if condition_value(env.get_value(seg.cond)) else "false"
            if on_branch is not None:
                on_branch(seg, label)
            execute_segments(seg.branches[label], env, run_segment, on_branch, release)
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


class StepInputs:
    """The inputs of one step of a ModelProgram: the tensors the batch holds now (``arg.<i>``,
    ``meta.<path>``), looked up afresh every step, and the host prologue's outputs
    (``hoisted.<k>``), run every step."""

    def __init__(self, mp: ModelProgram, pool: RunnerPool | None = None) -> None:
        if mp.program is None:
            raise ConfigError("no program to run: the step is several SOT graphs")
        self.mp = mp
        self.pool = pool if pool is not None else RunnerPool(mp.params)
        self.params = self.pool.params
        names = list(data_ops(mp.program))
        if mp.prologue is not None:
            names += [n for n in data_ops(mp.prologue.program) if n not in names]
        hoisted = set(mp.prologue.outputs) if mp.prologue is not None else set()
        self.names = [n for n in names if n not in hoisted]
        # where each input comes from, decided once: (name, arg index or meta path)
        self._args: list[tuple[str, int]] = []
        self._meta: list[tuple[str, str]] = []
        for name in self.names:
            head, _, rest = name.partition(".")
            if head == "arg":
                self._args.append((name, int(rest)))
            elif head == "meta":
                self._meta.append((name, rest))
            elif name not in self.params:  # `const.<k>`: a model buffer, fed by the runners
                raise ConfigError(f"program input {name!r} has no source: expected arg.<i>, "
                                  "meta.<field> or a hoisted.<k> fed by the host prologue")

    def __call__(self, batch: StepBatch) -> dict[str, paddle.Tensor]:
        feeds: dict[str, paddle.Tensor] = {name: as_tensor(batch.args[i])
                                           for name, i in self._args}
        for name, path in self._meta:
            feeds[name] = as_tensor(resolve_meta_field(batch.meta, path))
        prologue = self.mp.prologue
        if prologue is not None:
            outs = self.pool.get(prologue.program).run(feeds)
            feeds.update(zip(prologue.outputs, outs, strict=True))
        return feeds


class WholeProgramStep:
    """Runs the unsplit program of a ModelProgram, one ``run_program`` call per step (no
    capture)."""

    def __init__(self, mp: ModelProgram, pool: RunnerPool | None = None) -> None:
        self.inputs = StepInputs(mp, pool)
        self.runner: ProgramRunner = self.inputs.pool.get(mp.program)

    def run(self, batch: StepBatch) -> list[paddle.Tensor]:
        return self.runner.run(self.inputs(batch))


class StepExecutor:
    """Runs one decoder step of a segmented ModelProgram (see the module docstring).

    ``backend``: ``emulator`` (CPU replay emulator), ``cuda`` (CUDA graphs; CUDA builds only) or
    ``none`` (segments run uncaptured, no padding). ``check_captures``: compare each new graph
    with an uncaptured run and drop it if it differs (see CaptureManager). ``stats()`` returns
    the counters: graphs captured, replays, warm-up runs, eager fallbacks (+ reasons), steps,
    eager segment runs.
    """

    def __init__(
        self,
        mp: ModelProgram,
        backend: str = "emulator",
        capture_sizes: Sequence[int] = DEFAULT_CAPTURE_SIZES,
        num_warmups: int = 1,
        pool: RunnerPool | None = None,
        *,
        check_captures: bool = False,
        check_atol: float = 1e-4,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown runtime backend {backend!r}: choose one of "
                              f"{', '.join(BACKENDS)}")
        if mp.segments is None:
            raise ConfigError(NO_PLAN)
        self.mp = mp
        self.backend_name = str(getattr(backend, "value", backend))
        self.plan: SegmentPlan = mp.segments
        self.feeds = StepInputs(mp, pool)
        self.pool = self.feeds.pool
        self.params = self.pool.params
        backend_obj = make_backend(backend, self.pool)
        self.capture = (CaptureManager(backend_obj, list(capture_sizes), num_warmups,
                                       check=check_captures, check_atol=check_atol)
                        if backend_obj is not None else None)
        self._release = self.plan.release_schedule()
        self._whole: WholeProgramStep | None = None
        self.steps = 0
        self.eager_segment_runs = 0
        self.branches_taken: dict[str, int] = {"true": 0, "false": 0}

    # -- running -------------------------------------------------------------------------------
    def _run_eager(self, seg: Segment, feeds: Mapping[str, paddle.Tensor]
                   ) -> list[paddle.Tensor]:
        self.eager_segment_runs += 1
        return self.pool.get(seg.program).run(feeds)

    def _note_branch(self, seg: Segment, label: str) -> None:
        self.branches_taken[label] += 1

    def run(self, batch: StepBatch) -> list[paddle.Tensor]:
        """One step: ``[logits, *new_state]`` with logits cut back to the batch's tokens.

        The new state is returned, not written back: commit it with
        ``mp.model.commit_state(outs[1:])`` when the step is real.
        """
        self.steps += 1
        num_tokens = batch.num_tokens
        size = self.capture.size_for(num_tokens) if self.capture is not None else None
        if self.capture is None or size is None:
            if self.capture is not None:
                self.capture.note_fallback(
                    f"batch of {num_tokens} tokens exceeds the largest capture size "
                    f"{self.capture.sizes[-1]}"
                )
            env = _Env(self.feeds(batch), self.params)
            execute_segments(self.plan.segments, env, self._run_eager, self._note_branch,
                             self._release)
            return [env.get_value(k) for k in self.plan.outputs]
        padded = batch if size == num_tokens else self.mp.model.pad_batch(batch, size)
        env = _Env(self.feeds(padded), self.params)

        def run_one(seg: Segment, seg_feeds: Mapping[str, paddle.Tensor]
                    ) -> list[paddle.Tensor]:
            if seg.kind == CAPTURED:
                return self.capture.run(seg, size, seg_feeds)
            return self._run_eager(seg, seg_feeds)

        execute_segments(self.plan.segments, env, run_one, self._note_branch, self._release)
        outs = [env.get_value(k) for k in self.plan.outputs]
        if outs:
            outs[0] = outs[0][:num_tokens]  # logits rows; state tensors are full-size
        return outs

    def run_whole(self, batch: StepBatch) -> list[paddle.Tensor]:
        """Run the unsplit ``mp.program`` in one call (reference for comparisons)."""
        if self._whole is None:
            self._whole = WholeProgramStep(self.mp, self.pool)
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
