"""Check an optimized ModelProgram against the eager model it came from.

Two checks, both on random steps whose host values change from step to step (a check that
compares one step per trace cannot see a program that reads stale host values):

* numerics: one prefill, one decode and one mixed step, optimized (uncaptured) vs eager, on the
  same cache state; with a segment plan, the unsplit program is compared too;
* replay: ``verify.steps`` random steps through the capture backend (the CPU replay emulator or
  CUDA graphs): capture once per (segment, size), replay after, every output compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle

from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import op_count
from graphopt.models.base import BATCH_KINDS
from graphopt.runtime.executor import RunnerPool
from graphopt.runtime.step import StepExecutor, WholeProgramStep


def max_abs_err(a: list[Any], b: list[Any]) -> float:
    """Largest absolute difference over paired tensors or arrays (inf when shapes differ)."""
    err = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = _array(x), _array(y)
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            err = max(err, float(np.max(np.abs(x - y))))
    return err


def _array(x: Any) -> np.ndarray:
    if isinstance(x, paddle.Tensor):
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class Numerics:
    """Max abs error per batch kind: the optimized step, and the unsplit program."""

    optimized: dict[str, float] = field(default_factory=dict)
    whole_program: dict[str, float] = field(default_factory=dict)
    #: what ran as "optimized": segments | whole program | SOT's own graphs
    ran: str = ""
    #: why the unsplit program was not compared (None: it was, or there is none)
    whole_program_skipped: str | None = None


def check_numerics(mp: ModelProgram, rng: np.random.Generator,
                   pool: RunnerPool | None = None, whole_program_max_ops: int = 4000
                   ) -> Numerics:
    """One step of each kind, optimized vs eager, on the same cache state.

    With a segment plan, the segments are what runs and what is checked; the unsplit program is
    checked too when it has at most `whole_program_max_ops` ops (it is what the plan was cut
    from, and compiling it as one block grows faster than its size). `pool` shares compiled
    programs with the other checks (the replay reuses every segment runner built here)."""
    bundle = mp.model
    out = Numerics()
    step = None
    whole = False
    if mp.segments is not None:
        step = StepExecutor(mp, backend="none", capture_sizes=[1], num_warmups=0, pool=pool)
        out.ran = "segments (uncaptured)"
        ops = op_count(mp.program)
        whole = ops <= whole_program_max_ops
        if not whole:
            out.whole_program_skipped = (
                f"the unsplit program has {ops} ops > verify.whole_program_max_ops="
                f"{whole_program_max_ops}; its segments were checked")
    elif mp.program is not None:
        step = WholeProgramStep(mp, pool)
        out.ran = "whole program"
    else:
        out.ran = f"SOT's {mp.trace.subgraphs} graphs"
    for kind in BATCH_KINDS:
        batch = bundle.random_batch(rng, kind)
        eager = bundle.step(batch, commit=False)
        if step is None:
            with paddle.no_grad():
                got = [o.numpy() for o in _flat(mp.sot_step(*batch.args, batch.meta))]
        else:
            got = step.run(batch)
            if whole and isinstance(step, StepExecutor):
                out.whole_program[kind] = max_abs_err(step.run_whole(batch), eager)
        out.optimized[kind] = max_abs_err(got, eager)
        bundle.commit_state(eager[1:])
    return out


def _flat(outs: Any) -> list[Any]:
    return list(outs) if isinstance(outs, (tuple, list)) else [outs]


@dataclass
class Replay:
    """What replaying random steps through the capture backend found."""

    backend: str
    steps: int = 0
    mismatches: int = 0
    atol: float = 0.0
    max_abs_err: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    #: why no step was replayed (None when some were)
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if v is not None}
        return d


def check_replay(mp: ModelProgram, rng: np.random.Generator, *, backend: str, steps: int,
                 capture_sizes: list[int], num_warmups: int, atol: float,
                 pool: RunnerPool | None = None) -> Replay:
    """`steps` random steps of mixed kinds through the capture backend, each vs eager."""
    out = Replay(backend=backend, atol=atol)
    if mp.segments is None:
        out.skipped = ("the step is several SOT graphs: nothing to capture" if mp.program is None
                       else "no segment plan: piecewise-split is not in the pipeline")
        return out
    if backend == "none" or not steps:
        out.skipped = "runtime.backend=none" if backend == "none" else "verify.steps=0"
        return out
    executor = StepExecutor(mp, backend=backend, capture_sizes=capture_sizes,
                            num_warmups=num_warmups, pool=pool)
    kinds = [BATCH_KINDS[i % len(BATCH_KINDS)] for i in range(steps)]
    rng.shuffle(kinds)
    errs = []
    bundle = mp.model
    for kind in kinds:
        batch = bundle.random_batch(rng, kind)
        eager = bundle.step(batch, commit=False)
        errs.append(max_abs_err(executor.run(batch), eager))
        bundle.commit_state(eager[1:])
    out.steps = len(errs)
    out.mismatches = sum(e > atol for e in errs)
    out.max_abs_err = max(errs)
    out.kinds = {k: kinds.count(k) for k in BATCH_KINDS if k in kinds}
    out.stats = executor.stats()
    return out
