"""Run a specialised ModelProgram: dispatch each step to its variant, one graph per
(variant, capture size).

specialize-branches made one if-free program per feasible combination of host-decided branch
conditions, and piecewise-split gave each a plan (one captured segment when nothing in it is
blacklisted: a full graph). One step::

    size    <- the smallest capture size >= the batch's tokens (None: above the largest)
    feeds   <- the batch padded to `size`, BY VALUE, plus the host prologue's outputs
    values  <- each host condition's value in those feeds (the prologue computed them)
    target  <- the one variant whose conditions match; none matches -> the general program's
               plan (ifs eager) when the pipeline kept one (FULL_AND_PIECEWISE), else a
               DispatchError: refused, never run with a wrong branch
    run     <- the target's plan through its own CaptureManager: warm up and capture once per
               (target, size), replay after

The dispatch key is ``(target, size)``, like vLLM's ``BatchDescriptor(num_tokens,
uniform_decode)``: the conditions say which program runs, the padded size which graph of it.
Above the largest capture size the step runs its target uncaptured, and the reason is counted.
The capture backends and their orchestration (:mod:`graphopt.runtime.capture`) are the ones
the piecewise runner uses. Each target gets its own manager and backend, because segment ids
are only unique within one plan.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.errors import ConfigError, DispatchError
from graphopt.ir.model_program import ModelProgram, combination_name
from graphopt.ir.segment_plan import CAPTURED, Segment, SegmentPlan
from graphopt.models.base import StepBatch
from graphopt.runtime.backend import Backend, BackendFactory, make_backend
from graphopt.runtime.capture import (
    DEFAULT_CAPTURE_SIZES,
    CaptureCheck,
    CaptureManager,
    capture_size_for,
    check_capture_sizes,
)
from graphopt.runtime.executor import RunnerPool
from graphopt.runtime.step import (
    StepInputs,
    WholeProgramStep,
    _Env,
    capture_check,
    execute_segments,
)

#: dispatch name of the general program (the combinations no variant serves, hybrid only)
GENERAL = "general"

NO_VARIANTS = ("no specialised variants: the runtime executes what specialize-branches built; "
               "add it to the pipeline (e.g. pipeline=full_graph)")



@dataclass
class _Target:
    """One program the dispatcher can run: a variant, or the general program."""

    name: str
    program: Any
    plan: SegmentPlan | None
    manager: CaptureManager | None
    #: the plan's release schedule (see SegmentPlan.release_schedule)
    release: dict[int, list[str]] | None = None


@dataclass
class PreparedVariantStep:
    """A step's inputs in the backend's memory, padded, and the target that runs them."""

    feeds: dict[str, Any]
    num_tokens: int
    size: int | None
    target: _Target


class VariantStepExecutor:
    """Runs decoder steps of a specialised ModelProgram (see the module docstring).

    ``backend``: a registered backend name (``emulator``, ``none``, ``torch_cpu``,
    ``torch_cuda``, ...). Without capture (a backend that does not capture, or
    ``capture=False``) nothing is padded and a variant without a plan runs as one program.
    ``check_captures``: replays are compared with uncaptured runs (see CaptureCheck).
    ``backend_factory`` replaces :func:`make_backend` (tests inject a backend that corrupts a
    replay).
    """

    def __init__(
        self,
        mp: ModelProgram,
        backend: str = "emulator",
        capture_sizes: Sequence[int] = DEFAULT_CAPTURE_SIZES,
        num_warmups: int = 1,
        pool: RunnerPool | None = None,
        *,
        check_captures: CaptureCheck | bool | None = None,
        capture: bool = True,
        backend_factory: BackendFactory = make_backend,
    ) -> None:
        if not mp.variants or mp.specialization is None:
            raise ConfigError(NO_VARIANTS)
        self.mp = mp
        self.spec = mp.specialization
        self.sizes = check_capture_sizes(list(capture_sizes))
        self.pool = pool if pool is not None else RunnerPool(mp.params)
        # the backend of the step's inputs and uncaptured runs; each target captures through
        # its own, because segment ids are only unique within one plan
        self.backend: Backend = backend_factory(backend, self.pool)
        self.backend_name = self.backend.name
        self.captured = capture and self.backend.captures
        self.feeds = StepInputs(mp, self.pool, self.backend)
        check = capture_check(check_captures)

        def target(name: str, program: Any, plan: SegmentPlan | None) -> _Target:
            if self.captured and plan is None:
                raise ConfigError(f"{name}: no segment plan to capture; add piecewise-split "
                                  "to the pipeline (e.g. pipeline=full_graph)")
            manager = (CaptureManager(backend_factory(backend, self.pool), self.sizes,
                                      num_warmups, check=check)
                       if self.captured else None)
            if manager is not None and plan is not None:
                manager.backend.note_plan(plan)
            return _Target(name, program, plan, manager,
                           plan.release_schedule() if plan is not None else None)

        self.targets = {v.name: target(v.name, v.program, v.segments) for v in mp.variants}
        # The general program (ifs eager) serves whatever no variant does, when a pass
        # planned it for that purpose (the hybrid); otherwise such a step is refused.
        self.general = (target(GENERAL, mp.program, mp.segments)
                        if self.spec.general and (mp.segments is not None or not self.captured)
                        else None)
        self._whole: WholeProgramStep | None = None
        self.steps = 0
        self.eager_segment_runs = 0
        self.dispatch: Counter[tuple[str, int | None]] = Counter()
        self.fallback_reasons: Counter[str] = Counter()
        #: the target the latest step ran
        self.last_target: str | None = None
        #: combinations the specialisation never saw, met at run time and run by the general
        #: program (the hybrid)
        self.unseen: Counter[str] = Counter()

    # -- dispatch -----------------------------------------------------------------------------
    def select(self, feeds: Mapping[str, np.ndarray], batch: StepBatch | None = None) -> _Target:
        """The target for a step's feeds; DispatchError when nothing can run it correctly."""
        try:
            values = self.spec.values(feeds)
        except ValueError as e:
            raise DispatchError(f"cannot read the step's branch conditions: {e}") from e
        hits = [v for v in self.mp.variants if v.matches(values)]
        if len(hits) == 1:
            return self.targets[hits[0].name]
        combo = combination_name(values)
        if not hits and self.general is not None:
            if values not in self.spec.feasible:
                self.unseen[combo] += 1
            return self.general
        what = (f"a {batch.kind} step of {batch.num_tokens} tokens" if batch is not None
                else "a step")
        built = "; ".join(f"{v.name}" + (f" ({v.label})" if v.label else "")
                          for v in self.mp.variants)
        if hits:
            raise DispatchError(f"{what} has branch conditions {combo}, served by "
                                f"{len(hits)} variants ({built}): the variants overlap")
        unreachable = ", ".join(combination_name(c) for c in self.spec.unreachable) or "none"
        raise DispatchError(
            f"{what} has branch conditions {combo}, which no built variant serves (built: "
            f"{built}; left out as unreachable: {unreachable}). Refusing to run it rather "
            "than take a wrong branch. Rule used: " + self.spec.rule + ". Fix: specialize-"
            "branches with feasibility=all or more samples_per_kind, or a pipeline that keeps "
            "the general program for such steps (pipeline=full_and_piecewise)."
        )

    # -- running ------------------------------------------------------------------------------
    def prepare(self, batch: StepBatch) -> PreparedVariantStep:
        """The step's inputs in the backend's memory, padded to its capture size, and the
        target its branch conditions select."""
        num_tokens = batch.num_tokens
        size = capture_size_for(self.sizes, num_tokens) if self.captured else None
        padded = (batch if size is None or size == num_tokens
                  else self.mp.model.pad_batch(batch, size))
        feeds = self.feeds(padded)
        return PreparedVariantStep(feeds, num_tokens, size, self.select(feeds, batch))

    def run(self, batch: StepBatch) -> list[Any]:
        """One step: ``[logits, *new_state]`` with logits cut back to the batch's tokens."""
        return self.execute(self.prepare(batch))

    def execute(self, step: PreparedVariantStep) -> list[Any]:
        """Run a prepared step (see :meth:`run`)."""
        target, size, num_tokens = step.target, step.size, step.num_tokens
        self.steps += 1
        if self.captured and size is None:
            reason = (f"batch of {num_tokens} tokens exceeds the largest capture size "
                      f"{self.sizes[-1]}")
            target.manager.note_fallback(reason)
            self.fallback_reasons[reason] += 1
        self.dispatch[(target.name, size)] += 1
        self.last_target = target.name
        outs = self._run_target(target, step.feeds, size)
        if outs and size is not None and size != num_tokens:
            outs[0] = outs[0][:num_tokens]  # logits rows; state tensors are full-size
        return outs

    def _run_target(self, target: _Target, feeds: Mapping[str, Any],
                    size: int | None) -> list[Any]:
        if target.plan is None:  # uncaptured and unplanned: the variant as one program
            return self.backend.run_program(target.program, feeds)

        def run_one(seg: Segment, seg_feeds: Mapping[str, Any]) -> list[Any]:
            if seg.kind == CAPTURED and size is not None and target.manager is not None:
                return target.manager.run(seg, size, seg_feeds)
            self.eager_segment_runs += 1
            return self.backend.run_program(seg.program, seg_feeds)

        env = _Env(feeds, self.backend.params)
        execute_segments(target.plan.segments, env, run_one, release=target.release,
                         condition=self.backend.condition)
        return [env.get_value(k) for k in target.plan.outputs]

    def run_whole(self, batch: StepBatch) -> list[Any]:
        """Run the unspecialised ``mp.program`` (ifs and all): the reference for comparisons."""
        if self._whole is None:
            self._whole = WholeProgramStep(self.mp, self.pool, self.backend)
        return self._whole.run(batch)

    # -- counters -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters so far: the capture counters summed over targets, dispatch counts per
        (target, size), per-target graphs and static input bytes, dropped graphs."""
        totals = Counter()
        dropped: list[dict[str, Any]] = []
        per_target: dict[str, Any] = {}
        static_bytes: Counter[int] = Counter()
        targets = [*self.targets.values(), *([self.general] if self.general else [])]
        for t in targets:
            entry: dict[str, Any] = {"captured_graphs": 0, "graph_sizes": [],
                                     "static_input_bytes": {}}
            if t.manager is not None:
                st = t.manager.stats
                for key in ("graphs_captured", "replays", "warmup_runs", "checked_graphs",
                            "checked_replays", "uncaptured_runs"):
                    totals[key] += getattr(st, key)
                dropped.extend({"target": t.name, **d} for d in st.dropped_graphs)
                entry["captured_graphs"] = len(t.manager.graphs)
                entry["graph_sizes"] = sorted({size for _, size in t.manager.graphs})
                entry["static_input_bytes"] = t.manager.static_input_bytes()
                static_bytes.update(entry["static_input_bytes"])
            entry["dropped_graphs"] = [d for d in dropped if d["target"] == t.name]
            per_target[t.name] = entry
        return {
            "backend": self.backend_name,
            "steps": self.steps,
            "eager_segment_runs": self.eager_segment_runs,
            "graphs_captured": totals["graphs_captured"],
            "replays": totals["replays"],
            "warmup_runs": totals["warmup_runs"],
            "checked_graphs": totals["checked_graphs"],
            "checked_replays": totals["checked_replays"],
            "dropped_graphs": dropped,
            "uncaptured_runs": totals["uncaptured_runs"],
            "eager_fallbacks": sum(self.fallback_reasons.values()),
            "fallback_reasons": dict(self.fallback_reasons),
            "capture_sizes": list(self.sizes) if self.captured else [],
            "dispatch": [{"target": name, "size": size, "steps": n}
                         for (name, size), n in sorted(self.dispatch.items(),
                                                       key=lambda kv: (kv[0][0], kv[0][1] or 0))],
            "unseen_combinations": dict(self.unseen),
            "targets": per_target,
            "static_input_bytes": dict(sorted(static_bytes.items())),
        }
