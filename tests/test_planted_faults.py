"""Planted faults: a bug is put into graphopt's core with ``monkeypatch`` and graphopt's own checks
must catch it ("honest verification", item 3).

Each row of :data:`FAULTS` plants one bug (no source file is edited) and runs one of the checks a
user gets: ``optimize(cfg)`` (its verify-each pass checkers, then numerics and replay vs eager,
raising ``VerificationError``), or, for bugs that only touch the runtime, the same
``check_numerics`` / ``check_replay`` / checked captures ``optimize`` calls, on a ModelProgram
built once per module. A row counts as caught only when the check complains, its complaint names
what broke, and the planted code provably changed something (:class:`Hits`: a fault that never
fired would "pass" for the wrong reason). ``test_without_a_fault_every_check_passes`` runs every
check clean, so a complaint is not noise.

== ================================= =========================================== =================================== =====================================================
#  fault                             planted in                                  caught by                           what the check says
== ================================= =========================================== =================================== =====================================================
1  rewrite fills placeholders with   ``branch_normalizer._compile``              ``optimize`` numerics vs the model  "differs from eager (the model as written)
   ones, not zeros (dsv3)                                                        as written (VerificationError)      uncaptured, on decode"
2a hoist forgets one condition       ``hoist_host_branch_conditions.hazards_of`` verify-each: hoist's ``ensures``    "property 'no-hazards' does not hold: 2 replay
   (its slice+cast stay captured)    (the pass's own look only)                  ``no-hazards`` (PassError)          hazard(s) left, first: ... tiny.py:79 (forward)"
2b hoist feeds one condition the     ``hoist_host_branch_conditions.add_output`` ``optimize`` numerics               "... uncaptured, on decode"
   value of another (stale feed)     (the prologue's outputs)                    (VerificationError)
3a split drops a segment (its ops)   ``piecewise_split.plan_model_program``      verify-each: split's ``ensures``    "5 compute op(s) are in no segment"
                                                                                 ``segmented`` (PassError)
3b split repeats a segment           ``piecewise_split.plan_model_program``      the same checker                    "5 compute op(s) are in more than one segment"
4  dispatch runs the wrong variant   ``VariantStepExecutor.select``              ``check_numerics`` (variants)       prefill and mixed differ; what each was dispatched to
5a backend does not copy one input   ``paddle_backends._copy_into_static``       checked captures, on_mismatch=fail  "captured graph of segment 0 (...) differs from an
   into its static buffer                                                        (CaptureCheckError)                 uncaptured run of its segment"
5b the same                          the same                                    ``check_replay`` vs eager           "N/M replayed steps differ from eager"
6  host prologue not re-run (first   ``StepInputs.__call__``                     ``check_numerics`` (segments)       decode and mixed differ
   step's conditions reused)
7  stale host value (max_len         ``StepInputs._stage``                       ``check_replay`` vs eager           "N/M replayed steps differ from eager"
   snapshotted on the first step)
8a variants overlap (``matches``     ``Variant.matches``                         the dispatcher (DispatchError)      "a prefill step ... hoisted.0=1,hoisted.1=0, served
   reads only the first condition)                                                                                   by 2 variants (...): the variants overlap"
8b the same, before the pass ran     ``Variant.matches``                         verify-each: ``specialized``        "feasible combination hoisted.0=1,hoisted.1=1 is
                                                                                 (PassError)                         served by 2 variants"
9  specialize folds the decode       ``specialize_branches.build_variant_        ``optimize`` numerics, full_graph   "... uncaptured, on decode"
   variant to the prefill branches   program``                                   (VerificationError)
== ================================= =========================================== =================================== =====================================================

Not a product fault but a fault in the check: ``ModelBundle.reference_step`` running the patched
model (the rewrite) instead of the model as written. With fault 1 planted too, ``optimize``
then verifies: fault 1 is caught only because the reference is honest
(``test_a_dishonest_reference_hides_the_rewrite_fault``).

What a check cannot see, and so is not the check used above: checked captures compare a replay
with an uncaptured run on the *same* feeds, so a wrong feed (fault 6) passes them
(``test_what_each_check_cannot_see``). Fault 4 sends decode steps to the mixed variant, which is
numerically right for them (its prefill branch is masked to zero): only prefill and mixed steps
differ. Faults 3a/3b are seen only by the plan checker (verify-each); with ``verify_each=false``
the runner fails on them with a KeyError (a value released or never produced), not with a
verification message.
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import pytest

import graphopt.passes.branch_normalizer as bn
import graphopt.passes.hoist_host_branch_conditions as hoist
import graphopt.passes.piecewise_split as split
import graphopt.passes.specialize_branches as spec
import graphopt.runtime.paddle_backends as pb
from graphopt.config import validate
from graphopt.driver import build_and_optimize, optimize
from graphopt.errors import GraphoptError
from graphopt.ir.model_program import ModelProgram, Variant
from graphopt.ir.segment_plan import CAPTURED
from graphopt.models.base import ModelBundle
from graphopt.runtime.capture import CaptureCheck
from graphopt.runtime.executor import RunnerPool, as_tensor
from graphopt.runtime.step import StepInputs
from graphopt.runtime.variants import VariantStepExecutor
from graphopt.verification import check_numerics, check_replay
from tests.conftest import compose_cfg

# -- configs: small, and each one built at most twice (clean, faulty) ------------------------------
#: a few replayed steps are enough: every fault here is wrong on most steps
FAST = ("verify.steps=4",)
TINY = ("model=tiny", *FAST)
TINY_FULL = ("model=tiny", "pipeline=full_graph", "full_cuda_graph=true", *FAST)
#: the rewrite's placeholders exist only in dsv3's FastDeploy 2025 attention (tiny defines its
#: output before the branches); one layer is enough to reach them
DSV3 = ("model=dsv3", "model.num_hidden_layers=1", "full_cuda_graph=false", *FAST)
#: one capture size that holds every tiny batch (<= 16 tokens), so every replay after the first
#: reuses the same graph: a stale static buffer shows from the second step on
SIZES = [16]
ATOL = 1e-5
REPLAY_ATOL = 1e-4


def _host(x: Any) -> np.ndarray:
    return x.numpy() if isinstance(x, paddle.Tensor) else np.asarray(x)


# -- what a planted fault did ---------------------------------------------------------------------
@dataclass
class Hits:
    """How often the planted code did something the correct code would not have done. Each plant
    computes the correct result next to the faulty one and counts the times they differ."""

    changed: int = 0


# -- the faults -----------------------------------------------------------------------------------
def plant_ones_fill(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """The define-before-branch rewrite defines its placeholders as ones instead of zeros (as in
    test_honest_reference.py): a decode-only step adds the decode output into ones."""
    compile_ = bn._compile

    def ones(src: Any, before: Mapping[str, list[str]], after: Any, *a: Any, **k: Any) -> Any:
        bad = {n: [line.replace(".zeros(", ".ones(") for line in lines]
               for n, lines in before.items()}
        hits.changed += sum(x != y for n in before for x, y in zip(before[n], bad[n], strict=True))
        return compile_(src, bad, after, *a, **k)

    m.setattr(bn, "_compile", ones)


def plant_hoist_forgets(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """The hoist pass overlooks the last condition's host chain (its slice + cast): they stay in
    the captured path. Only the pass's own first look is blinded; its checker sees the truth."""
    real = hoist.hazards_of
    calls = [0]

    def forgetful(mp: ModelProgram) -> list[Any]:
        hazards = real(mp)
        calls[0] += 1
        if calls[0] == 1 and len(hazards) > 2:
            hits.changed += 2
            return hazards[:-2]
        return hazards

    m.setattr(hoist, "hazards_of", forgetful)


def plant_hoist_miswired(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """The prologue feeds layer 1's decode condition (``hoisted.3``) with layer 1's prefill
    condition (``hoisted.2``): a stale feed, of the right shape and dtype."""
    real = hoist.add_output
    seen: dict[str, Any] = {}

    def miswired(program: Any, value: Any, name: str) -> Any:
        seen[name] = value
        if name == "hoisted.3" and "hoisted.2" in seen:
            hits.changed += 1
            value = seen["hoisted.2"]
        return real(program, value, name)

    m.setattr(hoist, "add_output", miswired)


def _last_captured(mp: ModelProgram) -> Any:
    return max((s for s in mp.segments.segments if s.kind == CAPTURED), key=lambda s: s.id)


def plant_split_drops(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """The split loses its last captured run (the final MLP and lm_head): those ops never run."""
    real = split.plan_model_program

    def dropping(mp: ModelProgram, *a: Any, **k: Any) -> Any:
        stats = real(mp, *a, **k)
        victim = _last_captured(mp)
        mp.segments.segments.remove(victim)
        hits.changed += victim.compute_ops
        return stats

    m.setattr(split, "plan_model_program", dropping)


def plant_split_repeats(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """The split lists its last captured run twice in a row: its ops run twice per step."""
    real = split.plan_model_program

    def repeating(mp: ModelProgram, *a: Any, **k: Any) -> Any:
        stats = real(mp, *a, **k)
        segs = mp.segments.segments
        victim = _last_captured(mp)
        segs.insert(segs.index(victim) + 1, victim)
        hits.changed += victim.compute_ops
        return stats

    m.setattr(split, "plan_model_program", repeating)


def plant_wrong_variant(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """Dispatch picks the variant after the right one (in build order) for every step."""
    real = VariantStepExecutor.select

    def select(self: VariantStepExecutor, feeds: Mapping[str, Any], batch: Any = None) -> Any:
        right = real(self, feeds, batch)
        names = list(self.targets)
        if right.name not in names:  # the general program: not a variant, leave it
            return right
        hits.changed += 1
        return self.targets[names[(names.index(right.name) + 1) % len(names)]]

    m.setattr(VariantStepExecutor, "select", select)


def plant_static_buffer(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """The emulator's replay leaves one input (the first one it copies, ``seg0.in0``) in its
    static buffer as captured: the graph computes on that input's capture-time value."""
    real = pb._copy_into_static
    skipped: list[str] = []

    def lazy(static: dict[str, Any], feeds: Mapping[str, Any], seg_id: int,
             bound: frozenset[str] = frozenset()) -> None:
        if not skipped:
            skipped.append(next(n for n in static if n not in bound))
        name = skipped[0]
        if name not in static:
            return real(static, feeds, seg_id, bound)
        if not np.array_equal(_host(as_tensor(feeds[name])), _host(static[name])):
            hits.changed += 1
        real({n: b for n, b in static.items() if n != name}, feeds, seg_id, bound)
        return None

    m.setattr(pb, "_copy_into_static", lazy)


def plant_prologue_once(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """The host prologue's outputs of an executor's first step are reused on every later step
    (as if it ran once). It still runs here, so that the steps it gets wrong can be counted."""
    real = StepInputs.__call__
    first: dict[int, tuple[StepInputs, dict[str, Any]]] = {}  # holds the object: ids stay unique

    def once(self: StepInputs, batch: Any) -> dict[str, Any]:
        feeds = real(self, batch)
        if self.mp.prologue is None:
            return feeds
        outs = self.mp.prologue.outputs
        kept = first.setdefault(id(self), (self, {n: feeds[n] for n in outs}))[1]
        if any(not np.array_equal(_host(kept[n]), _host(feeds[n])) for n in outs):
            hits.changed += 1
        feeds.update(kept)
        return feeds

    m.setattr(StepInputs, "__call__", once)


def plant_stale_host(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """The runtime reads ``meta.max_len_tensor_cpu`` once per executor and keeps that value (a
    copy of the first step's), instead of feeding it by value every step."""
    real = StepInputs._stage
    first: dict[tuple[int, str], tuple[StepInputs, paddle.Tensor]] = {}

    def stage(self: StepInputs, name: str, value: paddle.Tensor, host: bool) -> Any:
        if host and name == "meta.max_len_tensor_cpu":
            snap = first.setdefault((id(self), name), (self, value.clone()))[1]
            if not np.array_equal(snap.numpy(), value.numpy()):
                hits.changed += 1
            value = snap
        return real(self, name, value, host)

    m.setattr(StepInputs, "_stage", stage)


def plant_overlap(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """``Variant.matches`` reads only a variant's first condition: the prefill-only and the mixed
    variant both claim every step whose prefill condition is true."""
    real = Variant.matches

    def loose(self: Variant, values: Mapping[str, bool]) -> bool:
        first = list(self.conditions.items())[:1]
        got = all(values.get(n) == v for n, v in first)
        hits.changed += got != real(self, values)
        return got

    m.setattr(Variant, "matches", loose)


def plant_wrong_fold(m: pytest.MonkeyPatch, hits: Hits) -> None:
    """specialize-branches builds the decode-only variant (prefill false, decode true) with every
    condition negated, i.e. folds it to the prefill branches, and files it under the right name."""
    real = spec.build_variant_program

    def fold(program: Any, conditions: Any, values: dict[str, bool], *a: Any, **k: Any) -> Any:
        flags = list(values.values())
        if len(flags) == 2 and flags == [False, True]:
            hits.changed += 1
            prog, consulted, folded = real(program, conditions,
                                           {n: not v for n, v in values.items()}, *a, **k)
            return prog, {n: values[n] for n in consulted}, folded
        return real(program, conditions, values, *a, **k)

    m.setattr(spec, "build_variant_program", fold)


# -- the checks -----------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What a check said: its complaint (None: it passed) and what it measured."""

    complaint: str | None
    #: max abs error per batch kind (numerics), or per replay ("replay"): to compare the faulty
    #: run with the clean one
    numbers: dict[str, float] = field(default_factory=dict)


class Env:
    """What the checks share in this module: ModelPrograms built once (the runtime faults do not
    touch what the passes built), a runner pool each, and a directory for optimize's run dirs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._mps: dict[tuple[str, ...], tuple[ModelProgram, RunnerPool]] = {}
        self._runs = 0

    def run_dir(self) -> Path:
        self._runs += 1
        return self.root / f"run{self._runs}"

    def mp(self, args: tuple[str, ...]) -> tuple[ModelProgram, RunnerPool]:
        if args not in self._mps:
            cfg = compose_cfg(*args)
            mp, _, _ = build_and_optimize(cfg, validate(cfg), np.random.default_rng(0))
            # The source patches go now, as optimize() removes them when it is done: a later
            # build of the same model class must not trace (or rewrite) the patched code, and
            # what runs is the traced program anyway.
            mp.model.restore_patches(0)
            self._mps[args] = (mp, RunnerPool(mp.params))
        return self._mps[args]


def run_optimize(args: tuple[str, ...]) -> Callable[[Env], Verdict]:
    """``optimize(cfg)`` as a user runs it: any GraphoptError is the complaint; the numerics
    come from report.json, which optimize writes before it raises VerificationError."""

    def check(env: Env) -> Verdict:
        run_dir = env.run_dir()
        try:
            report = optimize(compose_cfg(*args), run_dir)
            complaint = None if report["verified"] else report.get("verify_message", "?")
        except GraphoptError as e:
            complaint = f"{type(e).__name__}: {e}"
            path = run_dir / "report.json"
            report = json.loads(path.read_text()) if path.is_file() else {}
        return Verdict(complaint, dict(report.get("numerics") or {}))

    return check


def run_numerics(args: tuple[str, ...]) -> Callable[[Env], Verdict]:
    """``check_numerics`` (optimize's first check): a step of each kind, uncaptured vs eager."""

    def check(env: Env) -> Verdict:
        mp, pool = env.mp(args)
        try:
            out = check_numerics(mp, np.random.default_rng(1), pool, backend="emulator")
        except GraphoptError as e:
            return Verdict(f"{type(e).__name__}: {e}")
        bad = [k for k, v in out.optimized.items() if not v <= ATOL]
        complaint = None
        if bad:
            complaint = (f"{out.ran} differ from eager on "
                         + ", ".join(f"{k} ({out.optimized[k]:.3g})" for k in bad)
                         + "".join(f"; {k} -> {out.dispatched[k]}" for k in bad
                                   if k in out.dispatched))
        return Verdict(complaint, dict(out.optimized))

    return check


def run_replay(args: tuple[str, ...], checked: bool = False) -> Callable[[Env], Verdict]:
    """``check_replay`` (optimize's second check): random steps through the emulator vs eager;
    `checked`: with checked captures that stop the run (``runtime.check_captures=true
    runtime.check_captures_on_mismatch=fail``)."""

    def check(env: Env) -> Verdict:
        mp, pool = env.mp(args)
        guard = CaptureCheck(atol=REPLAY_ATOL, replays=None, on_mismatch="fail") if checked \
            else None
        try:
            out = check_replay(mp, np.random.default_rng(2), backend="emulator", steps=6,
                               capture_sizes=SIZES, num_warmups=1, atol=REPLAY_ATOL,
                               check=guard, pool=pool)
        except GraphoptError as e:
            return Verdict(f"{type(e).__name__}: {e}")
        assert out.steps == 6 and out.stats["graphs_captured"] > 0  # it replayed something
        complaint = (f"{out.mismatches}/{out.steps} replayed steps differ from eager (max abs "
                     f"err {out.max_abs_err:.3g})" if out.mismatches else None)
        return Verdict(complaint, {"replay": out.max_abs_err})

    return check


#: every check a row can name; the clean-run test runs each one without a fault
CHECKS: dict[str, Callable[[Env], Verdict]] = {
    "optimize(tiny)": run_optimize(TINY),
    "optimize(tiny, full_graph)": run_optimize(TINY_FULL),
    "optimize(dsv3)": run_optimize(DSV3),
    "check_numerics(segments)": run_numerics(TINY),
    "check_numerics(variants)": run_numerics(TINY_FULL),
    "check_replay(emulator)": run_replay(TINY),
    "checked captures(fail)": run_replay(TINY, checked=True),
}


@dataclass(frozen=True)
class Fault:
    """One row of the table: a bug, where it goes, the check that must catch it, and what the
    check's complaint must contain."""

    key: str
    plant: Callable[[pytest.MonkeyPatch, Hits], None]
    check: str
    expect: tuple[str, ...]


DIFFERS = "differs from eager (the model as written) uncaptured, on decode"

#: the single source of truth: the tests below parametrize over it, the catch rate counts it
FAULTS = (
    Fault("1-rewrite-fill-ones", plant_ones_fill, "optimize(dsv3)",
          ("VerificationError", DIFFERS, "FastDeploy2025MLAAttention.forward")),
    Fault("2a-hoist-forgets-a-condition", plant_hoist_forgets, "optimize(tiny)",
          ("PassError", "pass 'hoist-host-branch-conditions' failed",
           "property 'no-hazards' does not hold: 2 replay hazard(s) left",
           "tiny.py:79 (forward)")),  # the forgotten condition: the decode `if`'s line
    Fault("2b-hoist-feeds-a-stale-condition", plant_hoist_miswired, "optimize(tiny)",
          ("VerificationError", DIFFERS)),
    Fault("3a-split-drops-a-segment", plant_split_drops, "optimize(tiny)",
          ("PassError", "pass 'piecewise-split' failed", "property 'segmented' does not hold",
           "5 compute op(s) are in no segment")),
    Fault("3b-split-repeats-a-segment", plant_split_repeats, "optimize(tiny)",
          ("PassError", "pass 'piecewise-split' failed", "property 'segmented' does not hold",
           "5 compute op(s) are in more than one segment")),
    Fault("4-dispatch-picks-another-variant", plant_wrong_variant, "check_numerics(variants)",
          ("variants (uncaptured) differ from eager on prefill", "mixed",
           "prefill -> hoisted.0=0,hoisted.1=1", "mixed -> hoisted.0=1,hoisted.1=0")),
    Fault("5a-static-buffer-not-copied", plant_static_buffer, "checked captures(fail)",
          ("CaptureCheckError", "captured graph of segment 0 (", "at capture size 16",
           "differs from an uncaptured run of its segment")),
    Fault("5b-static-buffer-not-copied", plant_static_buffer, "check_replay(emulator)",
          ("replayed steps differ from eager",)),
    Fault("6-prologue-not-rerun", plant_prologue_once, "check_numerics(segments)",
          ("segments (uncaptured) differ from eager on decode", "mixed")),
    Fault("7-stale-host-value", plant_stale_host, "check_replay(emulator)",
          ("replayed steps differ from eager",)),
    Fault("8a-variants-overlap-at-dispatch", plant_overlap, "check_numerics(variants)",
          ("DispatchError", "branch conditions hoisted.0=1,hoisted.1=0, served by 2 variants",
           "the variants overlap")),
    Fault("8b-variants-overlap-at-the-pass", plant_overlap, "optimize(tiny, full_graph)",
          ("PassError", "pass 'specialize-branches' failed",
           "property 'specialized' does not hold",
           "feasible combination hoisted.0=1,hoisted.1=1 is served by 2 variants")),
    Fault("9-specialize-folds-the-wrong-branch", plant_wrong_fold, "optimize(tiny, full_graph)",
          ("VerificationError", DIFFERS)),
)


@dataclass
class Outcome:
    """A fault's run: what the check said, and what the planted code did."""

    verdict: Verdict
    hits: Hits

    def caught(self, fault: Fault) -> bool:
        """Complained, named what broke, and the fault really fired."""
        said = self.verdict.complaint
        return (said is not None and self.hits.changed > 0
                and all(s in said for s in fault.expect))


_OUTCOMES: dict[str, Outcome] = {}
_CLEAN: dict[str, Verdict] = {}


def outcome(fault: Fault, env: Env) -> Outcome:
    """Plant `fault`, run its check, take the fault out again (once per module: the per-row test
    and the catch rate share the run)."""
    if fault.key not in _OUTCOMES:
        hits = Hits()
        with pytest.MonkeyPatch.context() as m:
            fault.plant(m, hits)
            verdict = CHECKS[fault.check](env)
        _OUTCOMES[fault.key] = Outcome(verdict, hits)
    return _OUTCOMES[fault.key]


def clean(check: str, env: Env) -> Verdict:
    """The check without any fault (once per module)."""
    if check not in _CLEAN:
        _CLEAN[check] = CHECKS[check](env)
    return _CLEAN[check]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield Env(tmp_path_factory.mktemp("planted"))
    _OUTCOMES.clear()
    _CLEAN.clear()


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("check", sorted({f.check for f in FAULTS}))
def test_without_a_fault_every_check_passes(check: str, env: Env) -> None:
    """The same checks, nothing planted: no complaint, and every number within tolerance."""
    verdict = clean(check, env)
    assert verdict.complaint is None, verdict.complaint
    tol = REPLAY_ATOL if "replay" in verdict.numbers else ATOL
    assert verdict.numbers and max(verdict.numbers.values()) <= tol


@pytest.mark.parametrize("fault", FAULTS, ids=[f.key for f in FAULTS])
def test_a_planted_fault_is_caught(fault: Fault, env: Env) -> None:
    out = outcome(fault, env)
    # the fault fired: the planted code did something the correct code would not have
    assert out.hits.changed > 0, f"{fault.key}: the planted code never changed anything"
    said = out.verdict.complaint
    assert said is not None, f"NOT CAUGHT: {fault.key} passed {fault.check}"
    for s in fault.expect:
        assert s in said, f"{fault.key}: {s!r} not in the complaint: {said}"
    # and it changed what the check measures, where the check measured something (a PassError
    # stops the run before any number): the faulty run differs from the clean one
    if out.verdict.numbers:
        base = clean(fault.check, env)
        assert out.verdict.numbers != base.numbers
        assert max(out.verdict.numbers.values()) > max(base.numbers.values())


def test_catch_rate_is_100_percent(env: Env) -> None:
    """Over the whole table (rows a -k filter skipped above are run here)."""
    missed = [f.key for f in FAULTS if not outcome(f, env).caught(f)]
    rate = 1 - len(missed) / len(FAULTS)
    assert rate == 1.0, f"catch rate {rate:.0%} over {len(FAULTS)} faults; missed: {missed}"
    # the docstring's table is for readers; FAULTS is the truth, and the table lists each row
    listed = set(re.findall(r"^(\d+[a-z]?) ", __doc__ or "", re.M))
    assert listed == {f.key.split("-")[0] for f in FAULTS}


def test_a_dishonest_reference_hides_the_rewrite_fault(env: Env) -> None:
    """A fault in the check itself: the reference runs the patched model (graphopt's rewrite)
    instead of the model as written. Fault 1 then verifies: it compares the rewrite with itself.
    So fault 1 is caught (row 1) only because reference_step is honest."""
    ran_patched = [0]

    def dishonest(self: ModelBundle, batch: Any, commit: bool = False) -> list[np.ndarray]:
        ran_patched[0] += bool(self.patch_checkpoint())
        return self.step(batch, commit)

    hits = Hits()
    with pytest.MonkeyPatch.context() as m:
        plant_ones_fill(m, hits)
        m.setattr(ModelBundle, "reference_step", dishonest)
        verdict = CHECKS["optimize(dsv3)"](env)
    assert hits.changed > 0 and ran_patched[0] > 0  # the fill is wrong, the reference patched
    assert verdict.complaint is None  # ... and nothing is noticed
    assert max(verdict.numbers.values()) == 0.0
    honest = outcome(FAULTS[0], env)  # the same fault with the honest reference
    assert honest.caught(FAULTS[0]) and honest.verdict.numbers["decode"] > 1.0


def test_what_each_check_cannot_see(env: Env) -> None:
    """Why row 6 uses the numerics and not checked captures: a checked capture compares a replay
    with an uncaptured run on the SAME feeds, so a wrong feed (the stale prologue) passes it.
    The fault fires; the capture check stays quiet; replay vs eager still sees it."""
    hits = Hits()
    with pytest.MonkeyPatch.context() as m:
        plant_prologue_once(m, hits)
        verdict = CHECKS["checked captures(fail)"](env)
    assert hits.changed > 0
    assert verdict.complaint is not None and "CaptureCheckError" not in verdict.complaint
    assert "replayed steps differ from eager" in verdict.complaint
