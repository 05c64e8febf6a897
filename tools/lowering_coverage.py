"""Which PIR op kinds graphopt's programs contain, and which have no PyTorch lowering.

    python tools/lowering_coverage.py                      # graphopt's own programs (below)
    python tools/lowering_coverage.py --config 'model=tiny pipeline=full_graph'
    python tools/lowering_coverage.py --config 'model=dsv3 model.num_hidden_layers=61'
    python tools/lowering_coverage.py --check              # also each op against Paddle
    python tools/lowering_coverage.py --lower              # lower all: sync points, transfers
    cd examples/byo_model && python ../../tools/lowering_coverage.py \\
        --config 'hydra.searchpath=[file://conf] model=my_deepseek'     # your own model

Each ``--config`` is one set of Hydra overrides, as ``tools/optimize.py`` takes them. Without
any, the set is every ``model.attention_form`` of the 4-layer dsv3 under the ``cudagraph``,
``cudagraph_no_hoist`` and ``full_graph`` pipelines, ``model=tiny`` (cudagraph and
full_graph) and ``examples/byo_model``. For each config the model is built and optimized
(``graphopt.driver.build_and_optimize``), and every program it yields is walked, nested blocks
included: the whole program, the host prologue, every segment program of the plan (branch
segments too), and every variant with its segments.

Prints one line per config, then one line per op kind (how many ops, in how many configs,
lowered or MISSING with the first source location); exits 1 when an op kind has no lowering.
``--lower`` lowers every program (on the CPU, with the host inputs the runtime gives it) and
prints each sync point (a device value read on the host) and per-step host-to-device transfer
it would have on a GPU. ``--check`` also runs every if-free program (prologue, variants, segments) once through Paddle
on a random mixed batch and compares each op's lowering with Paddle's values
(``graphopt.runtime.lowering.check``); mismatches are printed and exit 1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from graphopt.config import register_configs, validate  # noqa: E402
from graphopt.driver import build_and_optimize  # noqa: E402
from graphopt.ir.model_program import ModelProgram  # noqa: E402
from graphopt.ir.pir_utils import source_location, walk_ops  # noqa: E402
from graphopt.runtime.lowering import OPS, host_inputs_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BYO = REPO / "examples" / "byo_model"
FORMS = ("fastdeploy_2025", "fastdeploy_2026", "seed", "graphopt")
PIPELINES = ("cudagraph", "cudagraph_no_hoist", "full_graph")


def default_configs() -> list[list[str]]:
    """The programs graphopt itself produces (see the module docstring)."""
    out = [["model=dsv3", f"model.attention_form={form}", f"pipeline={pipe}"]
           for form in FORMS for pipe in PIPELINES]
    out.append(["model=tiny"])
    out.append(["model=tiny", "pipeline=full_graph"])
    out.append([f"hydra.searchpath=[file://{BYO / 'conf'}]", "model=my_deepseek"])
    return out


def compose_config(overrides: list[str]):
    """The config ``tools/optimize.py <overrides>`` runs with."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="graphopt.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def programs_of(mp: ModelProgram) -> Iterator[tuple[str, paddle.pir.Program]]:
    """``(label, program)`` of every program a ModelProgram yields, segments included."""
    if mp.program is not None:
        yield "program", mp.program
    if mp.prologue is not None:
        yield "prologue", mp.prologue.program
    if mp.segments is not None:
        for seg in mp.segments.walk():
            if seg.program is not None:
                yield f"segment {seg.id}", seg.program
    for v in mp.variants:
        yield f"variant {v.name}", v.program
        if v.segments is not None:
            for seg in v.segments.walk():
                if seg.program is not None:
                    yield f"variant {v.name} segment {seg.id}", seg.program


def build(overrides: list[str]) -> ModelProgram:
    if any("my_deepseek" in o for o in overrides) and str(BYO) not in sys.path:
        sys.path.insert(0, str(BYO))  # the example's builder is imported by `_target_`
    cfg = compose_config(overrides)
    mp, _, _ = build_and_optimize(cfg, validate(cfg), np.random.default_rng(0))
    mp.model.restore_patches(0)
    return mp


def check(mp: ModelProgram) -> list[str]:
    """Op-by-op checks, on a random mixed batch, of every if-free program of `mp`: the
    prologue and the variants on the step's feeds, and each segment that ran on the feeds it
    was given (segments of branches the batch does not take are not checked). The failures."""
    from graphopt.runtime.executor import RunnerPool
    from graphopt.runtime.lowering import segment_host_inputs, value_placement
    from graphopt.runtime.lowering.check import check_ops, run_plan_recording
    from graphopt.runtime.step import StepInputs

    pool = RunnerPool(mp.params)
    feeds = StepInputs(mp, pool)(mp.model.random_batch(np.random.default_rng(1), "mixed"))
    host = host_inputs_of(mp)
    bad: list[str] = []

    def run(label: str, program: paddle.pir.Program, program_feeds, host_inputs) -> None:
        bad.extend(f"{label}: {r}" for r in check_ops(program, mp.params, program_feeds,
                                                        host_inputs) if not r.ok)

    if mp.prologue is not None:
        run("prologue", mp.prologue.program, feeds, host)
    plans = [("", mp.program, mp.segments)] if mp.segments is not None else []
    for v in mp.variants:
        run(f"variant {v.name}", v.program, feeds, host)
        if v.segments is not None and len(v.segments.segments) > 1:
            plans.append((f"variant {v.name} ", v.program, v.segments))
    for prefix, program, plan in plans:
        placement = value_placement(program, host)
        for seg_run in run_plan_recording(plan, mp.params, feeds, pool)[0]:
            seg = seg_run.segment
            run(f"{prefix}segment {seg.id}", seg.program, seg_run.feeds,
                segment_host_inputs(seg, placement))
    return bad


def lower_all(mp: ModelProgram) -> tuple[int, list[str]]:
    """Lower every program of `mp` (on the CPU, with its host inputs: segments get theirs from
    the plan's program); how many, and their sync points and per-step transfers."""
    import torch

    from graphopt.runtime.lowering import (
        lower_program,
        segment_host_inputs,
        to_torch,
        value_placement,
    )

    params = {k: to_torch(v) if not isinstance(v, torch.Tensor) else v
              for k, v in mp.params.items()}
    host = host_inputs_of(mp)
    findings: list[str] = []
    count = 0

    def lower(label: str, program: paddle.pir.Program, host_inputs: list[str]) -> None:
        nonlocal count
        lowered = lower_program(program, params, host_inputs=host_inputs)
        count += 1
        findings.extend(f"{label}: sync point {s}" for s in lowered.sync_points)
        findings.extend(f"{label}: transfer {t}" for t in lowered.transfers)

    plans = []
    for label, program in programs_of(mp):
        if "segment" not in label:
            lower(label, program, host)
    if mp.segments is not None:
        plans.append(("", mp.program, mp.segments))
    plans += [(f"variant {v.name} ", v.program, v.segments) for v in mp.variants
              if v.segments is not None]
    for prefix, program, plan in plans:
        placement = value_placement(program, host)
        for seg in plan.walk():
            if seg.program is not None:
                lower(f"{prefix}segment {seg.id}", seg.program,
                      segment_host_inputs(seg, placement))
    return count, findings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[],
                    help="Hydra overrides of one config (quoted); repeatable")
    ap.add_argument("--check", action="store_true",
                    help="compare every op's lowering with Paddle on real data")
    ap.add_argument("--lower", action="store_true",
                    help="lower every program (CPU) and list sync points and transfers")
    args = ap.parse_args(argv)
    if os.getcwd() not in sys.path:  # a model's `_target_` is imported from here
        sys.path.insert(0, os.getcwd())
    configs = [shlex.split(c) for c in args.config] or default_configs()

    counts: Counter[str] = Counter()
    seen_in: dict[str, set[int]] = defaultdict(set)
    first_site: dict[str, str | None] = {}
    failures: list[str] = []
    for n, overrides in enumerate(configs):
        t0 = time.perf_counter()
        mp = build(overrides)
        kinds: set[str] = set()
        n_programs = 0
        for _, program in programs_of(mp):
            n_programs += 1
            for op in walk_ops(program.global_block()):
                name = op.name()
                counts[name] += 1
                kinds.add(name)
                seen_in[name].add(n)
                if name not in OPS and name not in first_site:
                    first_site[name] = source_location(op)
        missing = sorted(k for k in kinds if k not in OPS)
        line = (f"[{n + 1}/{len(configs)}] {' '.join(overrides)}: {n_programs} programs, "
                f"{len(kinds)} op kinds, missing {len(missing)}"
                + (f" ({', '.join(missing)})" if missing else ""))
        if args.lower and not missing:
            n_lowered, found = lower_all(mp)
            line += f", lowered {n_lowered}: {len(found)} sync points/transfers"
            for f in found:
                print(f"  {f}")
        if args.check:
            bad = check(mp)
            failures += [f"{' '.join(overrides)}: {b}" for b in bad]
            line += f", op checks: {'ok' if not bad else f'{len(bad)} MISMATCH'}"
        print(f"{line} ({time.perf_counter() - t0:.1f} s)", flush=True)

    print(f"\n{len(counts)} op kinds in all ({len(OPS)} lowerings in the table):")
    for name in sorted(counts):
        state = "lowered" if name in OPS else f"MISSING (first at {first_site[name]})"
        print(f"  {name:28s} {counts[name]:7d} ops in {len(seen_in[name]):2d} configs  {state}")
    missing = sorted(k for k in counts if k not in OPS)
    print(f"\nmissing lowerings: {len(missing)}" + (f" ({', '.join(missing)})" if missing
                                                    else ""))
    for f in failures:
        print(f"MISMATCH {f}")
    return 1 if missing or failures else 0


if __name__ == "__main__":
    sys.exit(main())
