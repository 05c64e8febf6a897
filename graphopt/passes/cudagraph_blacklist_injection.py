"""cudagraph-blacklist-injection: decide which ops must not be captured, and tell Paddle.

With ``full_cuda_graph=false`` the blacklist is: the control-flow ops still in the program (a CUDA
graph cannot capture a ``pd_op.if``), the splitting ops named in config, and the op names the
placement analysis proves host-bound (every instance of that op computes on the host). The result
goes into ``FLAGS_cuda_graph_blacklist`` — merged with what is already there, sorted, idempotent —
before anything is compiled (Paddle's CudaGraphExtractPass parses the flag once, on first use).

With ``full_cuda_graph=true`` and control flow left in the program this is an impossible
combination: one clear error names the ops, where they come from, and the ways out.

After specialize-branches, the programs that run are the if-free variants, plus the main program
only if some feasible combination has no variant (the hybrid): control flow is counted in those.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import paddle

from graphopt.errors import ConfigError
from graphopt.ir.model_program import ModelProgram, combination_name
from graphopt.ir.pir_utils import CONTROL_FLOW_OPS, NON_COMPUTE_OPS, branch_location, walk_ops
from graphopt.passes.analysis.placement import Placement, placement_of
from graphopt.passes.base import PRESERVES_PROGRAM, Pass, PassResult, Stage
from graphopt.passes.registry import register_pass
from graphopt.passes.verify import register_property_check

FLAG = "FLAGS_cuda_graph_blacklist"


@dataclass
class BlacklistOptions:
    """Options of cudagraph-blacklist-injection."""

    #: extra op names never to capture (vLLM's splitting_ops), e.g. ["pd_op.all_reduce"].
    splitting_ops: list[str] = field(default_factory=list)
    #: blacklist op names whose every instance is host-bound (placement analysis).
    include_host_bound: bool = True
    #: also set the process flag (off in tests that only want the computed list).
    set_flag: bool = True


def merge_flag(current: str, ops: list[str]) -> str:
    """Union of a comma list and `ops`, sorted, empty items dropped (idempotent)."""
    items = {s.strip() for s in current.split(",") if s.strip()} | set(ops)
    return ",".join(sorted(items))


@register_pass
class CudaGraphBlacklistInjection(Pass):
    """Decide which ops a CUDA graph must not capture and set Paddle's flag to match; refuse
    ``full_cuda_graph=true`` while control flow is left in a program that runs."""

    name = "cudagraph-blacklist-injection"
    summary = "Blacklist control-flow, splitting and host-bound ops; set FLAGS_cuda_graph_blacklist."
    stage = Stage.PROGRAM
    Options = BlacklistOptions
    requires = ("single-graph",)
    ensures = ("blacklisted",)
    preserves = (PRESERVES_PROGRAM,)
    must_run_after = ("hoist-host-branch-conditions",)

    def run(self, mp: ModelProgram) -> PassResult:
        ops = [op for program in programs_to_run(mp) for op in walk_ops(program.global_block())]
        control = Counter(op.name() for op in ops if op.name() in CONTROL_FLOW_OPS)

        if mp.full_cuda_graph and control:
            first = next(op for op in ops if op.name() in CONTROL_FLOW_OPS)
            prologue = mp.prologue.program if mp.prologue is not None else None
            where = branch_location(first, prologue) or "the traced program"
            found = ", ".join(f"{n} x{c}" for n, c in sorted(control.items()))
            which = "the program still has"
            if mp.variants:  # a hybrid: some combinations are left to the general program
                left = ", ".join(combination_name(c) for c in mp.specialization.general)
                which = f"the general program, which serves {left}, has"
            raise ConfigError(
                f"full_cuda_graph=true, but {which} control flow ({found}; first "
                f"at {where}) and a CUDA graph cannot capture it. Ways out: full_cuda_graph=false "
                "(capture piecewise around the control flow), or pipeline=full_graph (one "
                "if-free program per branch combination, see specialize-branches)."
            )

        host_bound: list[str] = []
        if self.options.include_host_bound and mp.host_inputs:
            host_bound = _host_bound_op_names(mp)

        blacklist = sorted(set(control) | set(self.options.splitting_ops) | set(host_bound))
        previous = list(mp.blacklist)
        mp.blacklist = sorted(set(mp.blacklist) | set(blacklist))
        users = _users_entries()
        value = merge_flag(users, mp.blacklist)
        mp.flags[FLAG] = value
        if self.options.set_flag:
            paddle.set_flags({FLAG: value})
            _ADDED_BY_US[:] = sorted(set(mp.blacklist) - set(users.split(",")))
        return PassResult(
            modified=mp.blacklist != previous,
            stats={
                "blacklist": mp.blacklist,
                "control_flow": dict(control),
                "splitting_ops": list(self.options.splitting_ops),
                "host_bound": host_bound,
                "flag": value,
            },
        )


def programs_to_run(mp: ModelProgram) -> list[paddle.pir.Program]:
    """The programs steps run: the specialised variants, and the main program unless variants
    serve every feasible combination (then its control flow is never launched)."""
    programs = [v.program for v in mp.variants]
    if mp.needs_general_program():
        programs.append(mp.program)
    return programs


#: entries this process's earlier runs added to the flag (the user had not set them): a later
#: model in the same process (a sweep's next job, a second served model) must not inherit them
_ADDED_BY_US: list[str] = []


def _users_entries() -> str:
    """The flag as the user set it: its current value without what graphopt added before."""
    ours = set(_ADDED_BY_US)
    return ",".join(e for e in _current_flag().split(",") if e and e not in ours)


def _current_flag() -> str:
    try:
        return paddle.get_flags(FLAG)[FLAG] or ""
    except (ValueError, KeyError):  # a build without the flag
        return ""


def _host_bound_op_names(mp) -> list[str]:
    """Op names all of whose instances produce host values derived from runtime inputs.

    Per-name, because FLAGS_cuda_graph_blacklist is per-name: blacklisting ``pd_op.cast`` because
    one cast is host-bound would stop every device cast from being captured.
    """
    placement = placement_of(mp)
    host: dict[str, bool] = {}
    for op in walk_ops(mp.program.global_block()):
        name = op.name()
        if name in NON_COMPUTE_OPS or name in CONTROL_FLOW_OPS or not op.results():
            continue
        is_host = all(placement.of(r) is Placement.HOST_RUNTIME for r in op.results())
        host[name] = host.get(name, True) and is_host
    return sorted(n for n, h in host.items() if h)


@register_property_check("blacklisted")
def _check_blacklisted(mp: ModelProgram) -> str | None:
    """Every control-flow op left in the program is blacklisted, in the ModelProgram and in the
    flag value handed to Paddle."""
    left = {op.name() for program in programs_to_run(mp)
            for op in walk_ops(program.global_block())} & CONTROL_FLOW_OPS
    missing = sorted(left - set(mp.blacklist))
    if missing:
        return f"control-flow ops not blacklisted: {', '.join(missing)}"
    flag = set(mp.flags.get(FLAG, "").split(","))
    if not set(mp.blacklist) <= flag:
        return f"{FLAG} lacks {', '.join(sorted(set(mp.blacklist) - flag))}"
    return None
