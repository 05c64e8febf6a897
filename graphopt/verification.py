"""Check an optimized ModelProgram against the eager model it came from.

"Eager" is the model as its authors wrote it: every reference step runs with graphopt's source
patches undone (:meth:`ModelBundle.reference_step`), never graphopt's own rewrite of the model,
which would compare the rewrite with itself.

Two checks, both on random steps whose host values change from step to step (a check that
compares one step per trace cannot see a program that reads stale host values):

* numerics: one prefill, one decode and one mixed step, optimized (uncaptured) vs eager, on the
  same cache state; with a segment plan or variants, the unsplit program is compared too (with
  variants, each kind runs the variant its conditions pick);
* replay: ``verify.steps`` random steps through the capture backend (the CPU replay emulator or
  CUDA graphs): capture once per (segment or variant, size), replay after, every output
  compared.

``verify.bisect=true`` adds :class:`NumericsInstrument`: on a rerun, the step is compared with
eager after every program pass, and the first pass that makes it differ is named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle

from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import op_count, program_text
from graphopt.models.base import BATCH_KINDS
from graphopt.passes.base import Pass, PassResult, Stage
from graphopt.passes.instruments import PassInstrument
from graphopt.runtime.backend import get_backend
from graphopt.runtime.capture import CaptureCheck
from graphopt.runtime.executor import RunnerPool
from graphopt.runtime.step import StepExecutor, WholeProgramStep
from graphopt.runtime.variants import VariantStepExecutor


def max_abs_err(a: list[Any], b: list[Any]) -> float:
    """Largest absolute difference over paired tensors or arrays.

    Infinite when shapes differ or when only one side is NaN (a NaN must never compare as
    "no difference": ``max(err, nan)`` would silently keep `err`). Equal infinities and NaN on
    both sides at one position count as equal.
    """
    err = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = _array(x), _array(y)
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            with np.errstate(invalid="ignore"):
                d = np.where(x == y, 0.0, np.abs(x - y))
            d[np.isnan(x) & np.isnan(y)] = 0.0
            if np.isnan(d).any():
                return float("inf")
            err = max(err, float(np.max(d)))
    return err


def _array(x: Any) -> np.ndarray:
    if isinstance(x, paddle.Tensor):
        x = x.numpy()
    elif hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, maybe on a GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class Numerics:
    """Max abs error per batch kind: the optimized step, and the unsplit program."""

    optimized: dict[str, float] = field(default_factory=dict)
    whole_program: dict[str, float] = field(default_factory=dict)
    #: what ran as "optimized": variants | segments | whole program | SOT's own graphs
    ran: str = ""
    #: with variants: the variant (or general program) each batch kind was dispatched to
    dispatched: dict[str, str] = field(default_factory=dict)
    #: why the unsplit program was not compared (None: it was, or there is none)
    whole_program_skipped: str | None = None
    #: what the optimized step was compared with (ModelBundle.reference_description)
    reference: str = ""


def check_numerics(mp: ModelProgram, rng: np.random.Generator,
                   pool: RunnerPool | None = None, whole_program_max_ops: int = 4000,
                   backend: str = "none") -> Numerics:
    """One step of each kind, optimized vs eager, on the same cache state.

    What runs is run uncaptured through `backend` (``runtime.backend``: Paddle for ``none``,
    ``emulator`` and ``cuda``, the PyTorch lowering for ``torch_*``).

    With a segment plan, the segments are what runs and what is checked; the unsplit program is
    checked too when it has at most `whole_program_max_ops` ops (it is what the plan was cut
    from, and compiling it as one block grows faster than its size). `pool` shares compiled
    programs with the other checks (the replay reuses every segment runner built here)."""
    bundle = mp.model
    out = Numerics(reference=bundle.reference_description())
    step = None
    whole = False
    if mp.segments is not None:
        on = "" if get_backend(backend).engine == "paddle" else f", {backend}"
        if mp.variants:
            step = VariantStepExecutor(mp, backend=backend, capture_sizes=[1], num_warmups=0,
                                       pool=pool, capture=False)
            out.ran = f"variants (uncaptured{on})"
        else:
            step = StepExecutor(mp, backend=backend, capture_sizes=[1], num_warmups=0,
                                pool=pool, capture=False)
            out.ran = f"segments (uncaptured{on})"
        ops = op_count(mp.program)
        whole = ops <= whole_program_max_ops
        if not whole:
            out.whole_program_skipped = (
                f"the unsplit program has {ops} ops > verify.whole_program_max_ops="
                f"{whole_program_max_ops}; what runs was checked")
    elif mp.program is not None:
        step = WholeProgramStep(mp, pool, backend)
        out.ran = "whole program" + ("" if get_backend(backend).engine == "paddle"
                                     else f" ({backend})")
    else:
        out.ran = f"SOT's {mp.trace.subgraphs} graphs"
    for kind in BATCH_KINDS:
        batch = bundle.random_batch(rng, kind)
        eager = bundle.reference_step(batch)
        if step is None:
            with paddle.no_grad():
                got = [o.numpy() for o in _flat(mp.sot_step(*batch.args, batch.meta))]
        else:
            got = step.run(batch)
            if whole and isinstance(step, (StepExecutor, VariantStepExecutor)):
                out.whole_program[kind] = max_abs_err(step.run_whole(batch), eager)
            if isinstance(step, VariantStepExecutor):
                out.dispatched[kind] = step.last_target
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
    #: set when this is not this run's check but the one the run that made the cache entry
    #: recorded (same program, plan, weights, seed and replay settings): says which run
    recorded: str | None = None
    #: what each replayed step was compared with (ModelBundle.reference_description)
    reference: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if v is not None}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Replay:
        """The inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def check_replay(mp: ModelProgram, rng: np.random.Generator, *, backend: str, steps: int,
                 capture_sizes: list[int], num_warmups: int, atol: float,
                 check: CaptureCheck | None = None,
                 pool: RunnerPool | None = None) -> Replay:
    """`steps` random steps of mixed kinds through the capture backend, each vs eager.

    With variants, each step is dispatched to its variant (one graph per (variant, size));
    with `check` (``runtime.check_captures``), replays are compared with uncaptured runs of
    their segments (see CaptureCheck).
    """
    out = Replay(backend=backend, atol=atol, reference=mp.model.reference_description())
    if mp.segments is None or any(v.segments is None for v in mp.variants):
        out.skipped = ("the step is several SOT graphs: nothing to capture" if mp.program is None
                       else "no segment plan: piecewise-split is not in the pipeline")
        return out
    if not steps:
        out.skipped = "verify.steps=0"
        return out
    if not get_backend(backend).captures:
        out.skipped = f"runtime.backend={backend} captures nothing"
        return out
    runner = VariantStepExecutor if mp.variants else StepExecutor
    executor = runner(mp, backend=backend, capture_sizes=capture_sizes,
                      num_warmups=num_warmups, check_captures=check, pool=pool)
    kinds = [BATCH_KINDS[i % len(BATCH_KINDS)] for i in range(steps)]
    rng.shuffle(kinds)
    errs = []
    bundle = mp.model
    for kind in kinds:
        batch = bundle.random_batch(rng, kind)
        eager = bundle.reference_step(batch)
        errs.append(max_abs_err(executor.run(batch), eager))
        bundle.commit_state(eager[1:])
    out.steps = len(errs)
    out.mismatches = sum(e > atol for e in errs)
    out.max_abs_err = max(errs)
    out.kinds = {k: kinds.count(k) for k in BATCH_KINDS if k in kinds}
    out.stats = executor.stats()
    return out


# -- bisect -------------------------------------------------------------------------------------


@dataclass
class BisectResult:
    """Which program pass first made the step differ from eager (``verify.bisect=true``)."""

    #: max abs error per batch kind after each checked point: ``[{"after", "errors"}]``; the
    #: first point is the traced input program (``after: "trace"``)
    checks: list[dict[str, Any]] = field(default_factory=list)
    #: the first pass whose output differs from eager (None: none did; "trace": its input)
    culprit: str | None = None
    #: files with the IR just before and just after the culprit, relative to the run dir
    ir_before: str | None = None
    ir_after: str | None = None
    #: source passes that changed the model's code before the trace (suspects when the traced
    #: program already differs from the model as written)
    source_passes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for report.json."""
        return dict(vars(self))

    def message(self, replay_note: str = "") -> str:
        """One line for the terminal."""
        if self.culprit is None:
            return ("bisect: every program pass left the numerics equal to eager (uncaptured)"
                    + (f"; {replay_note}" if replay_note else ""))
        if self.culprit == "trace":
            suspects = (f"; the source pass(es) {', '.join(self.source_passes)} rewrote the "
                        "model's code before the trace: the rewrite is the suspect"
                        if self.source_passes else "")
            return ("bisect: the traced program already differs from the model as written, "
                    "before any program pass" + suspects)
        at = [c for c in self.checks if c.get("after") == self.culprit]
        err = max(at[0]["errors"].values()) if at else float("nan")
        return (f"bisect: pass '{self.culprit}' is the first to make the step differ from eager "
                f"(max abs err {err:.3g}); IR before/after: {self.ir_before}, {self.ir_after}")


def step_errors(mp: ModelProgram, seed: int) -> dict[str, float]:
    """Max abs error per batch kind, `mp`'s program (its segments and variants too, if any)
    vs eager.

    Nothing is committed to the model's caches and the batches come from their own generator,
    so a check changes nothing that a later verification sees.
    """
    rng = np.random.default_rng(seed)
    bundle = mp.model
    runners: list[Any] = [WholeProgramStep(mp)]
    if mp.segments is not None:
        runners.append(StepExecutor(mp, backend="none", capture_sizes=[1], num_warmups=0))
    if mp.variants:
        runners.append(VariantStepExecutor(mp, backend="none", capture_sizes=[1],
                                           num_warmups=0))
    out: dict[str, float] = {}
    for kind in BATCH_KINDS:
        batch = bundle.random_batch(rng, kind)
        eager = bundle.reference_step(batch)
        out[kind] = max(max_abs_err(r.run(batch), eager) for r in runners)
    return out


class NumericsInstrument(PassInstrument):
    """After each program pass, the step vs eager; remembers the first pass that broke it.

    ``write(name, text)`` saves an IR dump (the caller decides where); the culprit's IR before
    and after are saved as ``<index>_<pass>.before.txt`` / ``.after.txt``.
    """

    def __init__(self, atol: float, seed: int, write: Callable[[str, str], str]) -> None:
        self.atol = atol
        self.seed = seed
        self.write = write
        self.result = BisectResult()
        self._before: str | None = None

    def _check(self, label: str, mp: ModelProgram) -> bool:
        errors = step_errors(mp, self.seed)
        self.result.checks.append({"after": label, "errors": errors})
        return max(errors.values()) > self.atol

    def before_pass(self, pass_: Pass, mp: ModelProgram, index: int) -> None:
        if pass_.stage is not Stage.PROGRAM or mp.program is None:
            return
        if not self.result.checks and self._check("trace", mp) and self.result.culprit is None:
            self.result.culprit = "trace"
        self._before = program_text(mp.program)

    def after_pass(self, pass_: Pass, mp: ModelProgram, index: int, result: PassResult) -> None:
        if pass_.stage is Stage.SOURCE and result.modified:
            self.result.source_passes.append(pass_.name)
        if pass_.stage is not Stage.PROGRAM or mp.program is None:
            return
        bad = self._check(pass_.name, mp)
        if bad and self.result.culprit is None:
            self.result.culprit = pass_.name
            stem = f"{index:03d}_{pass_.name}"
            self.result.ir_before = self.write(f"{stem}.before.txt", self._before or "")
            self.result.ir_after = self.write(f"{stem}.after.txt", program_text(mp.program))
