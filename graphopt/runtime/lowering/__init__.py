"""PIR programs lowered to PyTorch, op by op: how graphopt's plans run where Paddle cannot
(a GPU machine with PyTorch's CUDA build and Paddle's CPU build, DESIGN.md §12).

    lowered = lower_program(seg.program, params, device="cuda", host_inputs=[...])
    outs = lowered.run(feeds)          # one torch tensor per program output

* :data:`OPS` is the op table (PIR op name -> lowering), filled by :func:`lowering`;
  :func:`missing_lowerings` lists the ops of a program that have none
  (``tools/lowering_coverage.py`` lists them for graphopt's own programs).
* :func:`lower_program` resolves every attribute once and returns a
  :class:`LoweredProgram`: a flat list of closures over one list environment.
* Placement is the semantics: host values (the placement analysis's host classes, and shapes)
  stay on the CPU; :attr:`LoweredProgram.sync_points` lists every read of a device value on
  the host, :attr:`LoweredProgram.transfers` every per-step host-to-device copy.
* :func:`to_torch` / :func:`to_paddle` move tensors between the frameworks (shared on the CPU).
* :mod:`graphopt.runtime.lowering.check` compares lowerings with Paddle, op by op and whole
  programs.
"""

from graphopt.runtime.lowering.convert import to_paddle, to_torch, torch_dtype
from graphopt.runtime.lowering.program import (
    SHAPE_OPS,
    LoweredProgram,
    ValuePlacement,
    host_inputs_of,
    lower_op,
    lower_program,
    lowering_error,
    missing_lowerings,
    segment_host_inputs,
    value_placement,
)
from graphopt.runtime.lowering.registry import OPS, Kernel, OpInfo, lowering

__all__ = [
    "OPS",
    "SHAPE_OPS",
    "Kernel",
    "LoweredProgram",
    "OpInfo",
    "ValuePlacement",
    "host_inputs_of",
    "lower_op",
    "lower_program",
    "lowering",
    "lowering_error",
    "missing_lowerings",
    "segment_host_inputs",
    "to_paddle",
    "to_torch",
    "torch_dtype",
    "value_placement",
]
