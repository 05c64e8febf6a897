"""specialize-branches: one if-free program per combination of host-decided branch conditions.

After hoist-host-branch-conditions, an ``if`` whose condition comes from a runtime host input
reads it from a ``hoisted.<k>`` feed that the host prologue computes before launch. So the host
knows, before it launches anything, which branch each of those ``if``s takes, and the ``if``s
can be folded away. This pass does that:

1. *Conditions, from the program.* Every ``pd_op.if`` (nested ones too) whose condition operand
   is a ``pd_op.data`` fed by the prologue. Feeds that compute the same host expression (each
   layer re-reads ``max_len_tensor_cpu[1]``) form one condition. "The same" means equal
   expression trees in the prologue: op names, attributes and operands, down to its feeds.
2. *Combinations.* The 2^n combinations of condition values are enumerated. The feasibility rule
   (below) decides which can occur. The others are reported (stats ``unreachable``), not built.
3. *Variants.* For each feasible combination: copy the program and fold every decided ``if`` to
   its taken branch. A nested ``if`` surfaces when its parent is folded and is decided in the
   same walk. Then run Paddle's own DCE (the paddle-native machinery) and drop the condition
   feeds that are now unused. Combinations that fold the same way share one variant: a
   condition whose ``if``s all sit in a dropped branch is not one of that variant's conditions.

**Feasibility rule** (``feasibility=sampled``, the default): a combination can occur iff the
host prologue yields it for some batch the model produces. That is ``samples_per_kind`` random
batches (``mp.model.random_batch``) of every kind in ``models.base.BATCH_KINDS``, fed to the
prologue. A step whose conditions match no variant is refused at run time with an error. So a
combination the samples missed costs an error, never a wrong answer. ``feasibility=all`` builds
every combination (at most ``max_variants``) and needs no model batches.

**Hybrid** (FULL_AND_PIECEWISE): with ``variant_kinds=[decode]``, variants are built only for the
combinations whose sample batches were all of those kinds. The other feasible combinations stay
with the general program (``mp.specialization.general``), which piecewise-split plans with its
``if``s eager.

Before (``build_cond_program(hoisted=True)``)::

    %p = pd_op.data {name: "hoisted.0"}    %d = pd_op.data {name: "hoisted.1"}
    %y = pd_op.if(%p) { relu(matmul(%h, w1)) } else { %h }
    %z = pd_op.if(%d) { tanh(matmul(%y, w2)) } else { %y }

After, ``mp.variants`` holds e.g. variant ``hoisted.0=0,hoisted.1=1`` (decode only)::

    %z = pd_op.tanh(pd_op.matmul(%h, w2))

The main program is not changed.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle

from graphopt.errors import ConfigError, PassError
from graphopt.ir.host_eval import batch_feed, run_each
from graphopt.ir.model_program import (
    BranchCondition,
    ModelProgram,
    Specialization,
    Variant,
    combination_name,
)
from graphopt.ir.pir_utils import (
    CONTROL_FLOW_OPS,
    NON_COMPUTE_OPS,
    clone_program,
    data_name,
    data_ops,
    fold_decided_ifs,
    output_producers,
    parameter_name,
    run_paddle_passes,
    source_frame,
    source_location,
    walk_ops,
)
from graphopt.ir.sources import format_location, source_line
from graphopt.models.base import BATCH_KINDS
from graphopt.passes.base import PRESERVES_PROGRAM, Pass, PassResult, Stage
from graphopt.passes.paddle_native import check_pass_name
from graphopt.passes.registry import register_pass
from graphopt.passes.verify import check_program, register_property_check

#: above this many conditions the combinations are not listed one by one (2^n of them)
MAX_LISTED_CONDITIONS = 10


class Feasibility(str, enum.Enum):
    """How the pass decides which combinations of condition values can occur."""

    #: those the host prologue yields for random batches of every kind the model produces
    sampled = "sampled"
    #: every combination (no model batches needed; at most max_variants)
    all = "all"


@dataclass
class SpecializeBranchesOptions:
    """Options of specialize-branches."""

    #: sampled: combinations the prologue yields for the model's random batches; all: every one
    feasibility: Feasibility = Feasibility.sampled
    #: random batches per batch kind fed to the host prologue (feasibility=sampled)
    samples_per_kind: int = 16
    #: seed of those batches (the pass never draws from the run's own random stream)
    seed: int = 0
    #: build variants only for combinations seen exclusively with these batch kinds, e.g.
    #: [decode] (FULL_AND_PIECEWISE); the other feasible ones run the general program. Empty: all.
    variant_kinds: list[str] = field(default_factory=list)
    #: refuse to build more variants than this (there are 2^conditions combinations)
    max_variants: int = 16
    #: Paddle PIR passes run on every variant after folding (as paddle-native runs them)
    cleanup_passes: list[str] = field(default_factory=lambda: ["dead_code_elimination_pass"])

    def __post_init__(self) -> None:
        if self.samples_per_kind < 1:
            raise ValueError(f"samples_per_kind must be >= 1, got {self.samples_per_kind}")
        if self.max_variants < 1:
            raise ValueError(f"max_variants must be >= 1, got {self.max_variants}")
        bad = [k for k in self.variant_kinds if k not in BATCH_KINDS]
        if bad:
            raise ValueError(f"variant_kinds: unknown batch kind {bad[0]!r}; choose from "
                             f"{', '.join(BATCH_KINDS)}")
        if self.variant_kinds and self.feasibility is not Feasibility.sampled:
            raise ValueError("variant_kinds needs feasibility=sampled (kinds come from the "
                             "sample batches)")
        for name in self.cleanup_passes:
            check_pass_name(name)


@register_pass
class SpecializeBranches(Pass):
    """Fold host-decided ifs into one if-free variant per feasible combination (see module)."""

    name = "specialize-branches"
    summary = "Fold host-decided ifs: one if-free program variant per feasible combination of conditions."
    stage = Stage.PROGRAM
    Options = SpecializeBranchesOptions
    requires = ("single-graph",)
    ensures = ("specialized",)
    preserves = (PRESERVES_PROGRAM,)
    must_run_after = ("hoist-host-branch-conditions",)
    must_run_before = ("cudagraph-blacklist-injection", "piecewise-split")

    def run(self, mp: ModelProgram) -> PassResult:
        opts = self.options
        conditions, undecided = find_host_conditions(mp)
        if not conditions:
            why = "no if reads a condition the host computes before launch (a hoisted value " \
                  "or a host input)"
            return PassResult(False, {"conditions": 0, "variants": 0, "reason": why})
        if undecided:
            where = "; ".join(dict.fromkeys(undecided[:3]))
            loops = [u for u in undecided if u.startswith("pd_op.while")]
            if loops:  # a trip count is known only as the loop runs: no graph can hold it
                raise PassError(
                    f"{len(loops)} loop(s) run a number of times known only as they run "
                    f"({'; '.join(dict.fromkeys(loops[:3]))}), so no variant can be one "
                    "graph. Capture piecewise instead (pipeline=cudagraph full_cuda_graph="
                    "false): the loop runs uncaptured between captured segments")
            raise PassError(
                f"{len(undecided)} control-flow op(s) cannot be decided on the host before "
                f"launch ({where}), so no variant can be if-free. Hoist their conditions, or "
                "drop specialize-branches and capture piecewise (pipeline=cudagraph)"
            )
        n = len(conditions)
        names = [c.name for c in conditions]
        enumerated, seen, rule = self._feasibility(mp, conditions)
        order = enumerated if enumerated is not None else sorted(seen, reverse=True)
        feasible = [c for c in order if c in seen]
        unreachable = [c for c in (enumerated or []) if c not in seen]
        wanted = set(opts.variant_kinds)
        selected = [c for c in feasible if not wanted or (seen[c] and seen[c] <= wanted)]
        general = [c for c in feasible if c not in selected]
        if len(selected) > opts.max_variants:
            raise ConfigError(f"{len(selected)} feasible combinations need a variant each, more "
                              f"than max_variants={opts.max_variants}")

        variants: dict[tuple[tuple[str, bool], ...], Variant] = {}
        folded_ifs: dict[str, int] = {}
        for combo in selected:
            values = dict(zip(names, combo, strict=True))
            program, consulted, folded = build_variant_program(
                mp.program, conditions, values, opts.cleanup_passes)
            key = tuple(consulted.items())
            variant = variants.get(key)
            if variant is None:
                name = combination_name(consulted)
                variant = variants[key] = Variant(
                    name=name, conditions=consulted, program=program,
                    label=variant_label(conditions, consulted))
                folded_ifs[name] = folded
            variant.combinations.append(values)
            variant.kinds = [k for k in BATCH_KINDS if k in set(variant.kinds) | seen[combo]]

        # A variant that did not read some condition serves every value of it: a combination
        # left to the general program that such a variant matches is that variant's too.
        left: list[dict[str, bool]] = []
        for combo in general:
            values = dict(zip(names, combo, strict=True))
            match = next((v for v in variants.values() if v.matches(values)), None)
            if match is None:
                left.append(values)
            else:
                match.combinations.append(values)
                match.kinds = [k for k in BATCH_KINDS if k in set(match.kinds) | seen[combo]]
        mp.variants = list(variants.values())
        mp.specialization = Specialization(
            conditions=conditions,
            feasible=[dict(zip(names, c, strict=True)) for c in feasible],
            unreachable=[dict(zip(names, c, strict=True)) for c in unreachable],
            general=left,
            rule=rule,
        )
        return PassResult(True, {
            "conditions": n,
            "condition_feeds": sum(len(c.feeds) for c in conditions),
            "condition_labels": {c.name: c.label for c in conditions},
            "combinations": 2 ** n,
            "feasible": [combination_name(c) for c in mp.specialization.feasible],
            "unreachable": [combination_name(c) for c in mp.specialization.unreachable],
            "general": [combination_name(c) for c in mp.specialization.general],
            "ops_before": _compute_ops(mp.program),
            "variants": [
                {"name": v.name, "label": v.label, "kinds": list(v.kinds),
                 "ifs_folded": folded_ifs[v.name], "ops": _compute_ops(v.program)}
                for v in mp.variants
            ],
            "rule": rule,
        })


    def _feasibility(self, mp: ModelProgram, conditions: list[BranchCondition]
                     ) -> tuple[list[tuple[bool, ...]] | None, dict[tuple[bool, ...], set[str]], str]:
        """Every combination (None when too many to list), the feasible ones with the batch
        kinds each was seen with, and the rule used, in words."""
        opts = self.options
        n = len(conditions)
        enumerated = (list(itertools.product((True, False), repeat=n))
                      if n <= MAX_LISTED_CONDITIONS else None)
        if opts.feasibility is Feasibility.all:
            if enumerated is None or len(enumerated) > opts.max_variants:
                raise ConfigError(
                    f"feasibility=all: {n} conditions give {2 ** n} combinations, more than "
                    f"max_variants={opts.max_variants}; use feasibility=sampled")
            return enumerated, {c: set() for c in enumerated}, (
                "all: every combination of condition values is built")
        seen = sample_combinations(mp, conditions, opts.samples_per_kind, opts.seed)
        return enumerated, seen, (
            f"sampled: a combination can occur iff the host prologue yields it for one of "
            f"{opts.samples_per_kind} random batches of each kind ({', '.join(BATCH_KINDS)}); "
            "a step with any other combination is refused")


# -- conditions -------------------------------------------------------------------------------
def find_host_conditions(mp: ModelProgram) -> tuple[list[BranchCondition], list[str]]:
    """The host-decided conditions of `mp.program`, and where control flow that the host cannot
    decide before launch sits (``op at file:line``).

    A condition is a group of prologue-fed feeds that compute the same host expression; it is
    named after its first feed in prologue order and labelled with the model's source text.
    """
    hoisted = list(mp.prologue.outputs) if mp.prologue is not None else []
    # A host input the runtime feeds by value every step is decided before launch too (the
    # seed change's `forward_meta.needs_prefill`, computed by the engine's runner).
    direct = [n for n in data_ops(mp.program) if n in set(mp.host_inputs)]
    decided = hoisted + [n for n in direct if n not in hoisted]
    used: list[str] = []
    undecided: list[str] = []
    first_if: dict[str, paddle.pir.Operation] = {}
    for op in walk_ops(mp.program.global_block()):
        name = op.name()
        if name not in CONTROL_FLOW_OPS:
            continue
        feed = _condition_feed(op) if name == "pd_op.if" else None
        if feed is not None and feed in decided:
            if feed not in used:
                used.append(feed)
                first_if[feed] = op
        else:
            undecided.append(f"{name} at {source_location(op) or 'the traced program'}")
    if not used:
        return [], undecided
    exprs = _expression_ids(mp.prologue.program) if mp.prologue is not None else {}
    groups: dict[Any, list[str]] = {}
    for feed in sorted(used, key=decided.index):
        groups.setdefault(exprs.get(feed, f"feed:{feed}"), []).append(feed)
    producers = output_producers(mp.prologue.program) if mp.prologue is not None else {}
    conditions = []
    for feeds in groups.values():
        if feeds[0] in producers:
            frame = source_frame(producers[feeds[0]])
            label = condition_label(source_line(frame[0], frame[1])) if frame else ""
        else:  # a host input read as it is: named by its field, located at its first if
            frame = source_frame(first_if[feeds[0]])
            label = "forward_meta." + feeds[0].removeprefix("meta.")
        conditions.append(BranchCondition(
            name=feeds[0], feeds=tuple(feeds), label=label,
            location=format_location(*frame) if frame else ""))
    labels = [c.label for c in conditions]
    return [
        c if not c.label or labels.count(c.label) == 1
        else BranchCondition(c.name, c.feeds, f"{c.label} [{c.name}]", c.location)
        for c in conditions
    ], undecided


def _condition_feed(if_op: paddle.pir.Operation) -> str | None:
    """The feed name an ``if`` reads its condition from directly, or None."""
    src = if_op.operand_source(0).get_defining_op()
    return data_name(src) if src is not None and src.name() == "pd_op.data" else None


def _expression_ids(program: paddle.pir.Program) -> dict[str, int]:
    """Output name -> an id equal for outputs that compute the same expression (hash-consing
    over op names, attributes and operands; feeds and weights by name)."""
    table: dict[str, int] = {}
    value_ids: dict[Any, int] = {}
    for op in program.global_block().ops:
        name = op.name()
        if name == "builtin.shadow_output":
            continue
        if name == "pd_op.data":
            head = f"feed:{data_name(op)}"
        elif name == "builtin.parameter":
            head = f"param:{parameter_name(op)}"
        else:
            attrs = sorted((k, str(v)) for k, v in op.attrs().items() if k != "op_callstack")
            operands = [value_ids[op.operand_source(k).id] for k in range(op.num_operands())]
            head = f"{name}{attrs}{operands}"
        for i, r in enumerate(op.results()):
            value_ids[r.id] = table.setdefault(f"{head}#{i}", len(table))
    return {
        op.attrs()["output_name"]: value_ids[op.operand_source(0).id]
        for op in program.global_block().ops if op.name() == "builtin.shadow_output"
    }


_IF = re.compile(r"^(?:el)?if\s+(?P<cond>.+?)\s*:$")
_ASSIGN = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)\s*(?::[^=]+)?=(?!=)\s*\S")
_RETURN = re.compile(r"^return\s+(?P<expr>.+)$")


def condition_label(code: str) -> str:
    """The words for a condition, from the source line that computes it: the test of an
    ``if``/``elif``, the name a flag is assigned to, a returned expression, or the line."""
    for pattern, group in ((_IF, "cond"), (_ASSIGN, "name"), (_RETURN, "expr")):
        m = pattern.match(code)
        if m:
            return m.group(group).strip()
    return code


_ATOM = re.compile(r"^[\w.\[\]]+$")


def variant_label(conditions: Sequence[BranchCondition], values: dict[str, bool]) -> str:
    """``a and not b``, from the conditions' labels ("" when some label is unknown)."""
    by_name = {c.name: c for c in conditions}
    parts = []
    for name, value in values.items():
        label = by_name[name].label
        if not label:
            return ""
        if not value:
            label = f"not {label}" if _ATOM.match(label) else f"not ({label})"
        parts.append(label)
    return " and ".join(parts)


# -- feasibility ------------------------------------------------------------------------------
def sample_combinations(mp: ModelProgram, conditions: Sequence[BranchCondition],
                        samples_per_kind: int, seed: int) -> dict[tuple[bool, ...], set[str]]:
    """Combination of condition values -> the batch kinds it was seen with, over
    `samples_per_kind` random batches of each kind fed to the host prologue."""
    random_batch = getattr(mp.model, "random_batch", None)
    if random_batch is None:
        raise ConfigError(
            f"feasibility=sampled needs the model's random batches (mp.model.random_batch), and "
            f"{getattr(mp.model, 'name', 'this model')} has none: use feasibility=all")
    rng = np.random.default_rng(seed)
    prologue = mp.prologue
    names = list(data_ops(prologue.program)) if prologue is not None else []
    direct = sorted({f for c in conditions for f in c.feeds} - set(names)
                    - set(prologue.outputs if prologue is not None else ()))
    kinds, feeds = [], []
    for kind in BATCH_KINDS:
        for _ in range(samples_per_kind):
            batch = random_batch(rng, kind)
            feeds.append({n: batch_feed(n, batch, mp.params) for n in [*names, *direct]})
            kinds.append(kind)
    outs_per_batch = (run_each(prologue.program, mp.params, feeds) if prologue is not None
                      else [[] for _ in feeds])
    seen: dict[tuple[bool, ...], set[str]] = {}
    for kind, feed, outs in zip(kinds, feeds, outs_per_batch, strict=True):
        values = {**feed, **dict(zip(prologue.outputs if prologue else (), outs, strict=True))}
        try:
            combo = tuple(c.value(values) for c in conditions)
        except ValueError as e:
            raise PassError(f"a {kind} batch: {e}") from e
        seen.setdefault(combo, set()).add(kind)
    return seen


# -- folding ----------------------------------------------------------------------------------
def build_variant_program(
    program: paddle.pir.Program,
    conditions: Sequence[BranchCondition],
    values: dict[str, bool],
    cleanup_passes: Sequence[str],
) -> tuple[paddle.pir.Program, dict[str, bool], int]:
    """A copy of `program` with every ``if`` on one of `conditions` folded to the branch
    `values` gives it, cleaned by Paddle's `cleanup_passes`, without the condition feeds.

    Returns ``(program, the conditions some fold read -> their value, ifs folded)``.
    """
    feed_to_cond = {f: c.name for c in conditions for f in c.feeds}
    consulted: dict[str, bool] = {}

    def decide(if_op: paddle.pir.Operation) -> int | None:
        cond = feed_to_cond.get(_condition_feed(if_op) or "")
        if cond is None:
            return None
        consulted[cond] = values[cond]
        return 0 if values[cond] else 1

    variant = clone_program(program)
    folded = fold_decided_ifs(variant.global_block(), decide)
    run_paddle_passes(variant, cleanup_passes)
    block = variant.global_block()
    for op in list(block.ops):
        if op.name() == "pd_op.data" and data_name(op) in feed_to_cond and op.result(0).use_empty():
            block.remove_op(op)
    order = [c.name for c in conditions]
    return variant, {c: consulted[c] for c in order if c in consulted}, folded


def _compute_ops(program: paddle.pir.Program) -> int:
    return sum(1 for op in walk_ops(program.global_block()) if op.name() not in NON_COMPUTE_OPS)


def control_flow_left(program: paddle.pir.Program) -> list[str]:
    """Names of the control-flow and ``cf.*`` ops in `program` (nested included)."""
    return [op.name() for op in walk_ops(program.global_block())
            if op.name() in CONTROL_FLOW_OPS or op.name().startswith("cf.")]


@register_property_check("specialized")
def _check_specialized(mp: ModelProgram) -> str | None:
    """Every variant is a sound, if-free program, and each feasible combination is served by
    exactly one variant (or, when left to the general program, by none)."""
    spec = mp.specialization
    if spec is None:
        return "variants without a specialization record" if mp.variants else None
    for v in mp.variants:
        left = control_flow_left(v.program)
        if left:
            return f"variant {v.name} still has control flow: {', '.join(sorted(set(left)))}"
        problems = check_program(v.program)
        if problems:
            return f"variant {v.name} is broken: {problems[0]}"
    for combo in spec.feasible:
        hits = [v.name for v in mp.variants if v.matches(combo)]
        want = 0 if combo in spec.general else 1
        if len(hits) != want:
            return (f"feasible combination {combination_name(combo)} is served by "
                    f"{len(hits)} variants ({', '.join(hits) or 'none'}), expected {want}")
    served = [c for c in spec.feasible if c not in spec.general]
    for v in mp.variants:
        if not any(v.matches(c) for c in served):
            return f"variant {v.name} serves no feasible combination"
    both = [c for c in spec.unreachable if c in spec.feasible]
    if both:
        return f"combination {combination_name(both[0])} is both feasible and unreachable"
    return None
