"""Evaluate a small program on the host for a step batch, from below the runtime layer.

A pass sometimes has to know what the host computes for the batches a model can produce (e.g.
specialize-branches: which combinations of branch conditions the host prologue yields). Passes
sit below ``graphopt.runtime``, so they cannot use its step machinery; this module does the little
they need with Paddle's executor directly: resolve a program's feeds from a batch by the feed
naming convention of :mod:`graphopt.ir.model_program` and run the program once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import paddle

from graphopt.errors import ConfigError
from graphopt.ir.pir_utils import data_ops, output_values, parameter_name, static_mode
from graphopt.models.base import StepBatch, resolve_meta_field


def batch_feed(name: str, batch: StepBatch, params: Mapping[str, np.ndarray]) -> np.ndarray:
    """The value of feed `name` for `batch`: ``arg.<i>``, ``meta.<path>`` or a ``const.<k>``
    buffer held with the weights. A copy, so the batch's tensors are never shared."""
    head, _, rest = name.partition(".")
    if head == "arg":
        value = batch.args[int(rest)]
    elif head == "meta":
        value = resolve_meta_field(batch.meta, rest)
    elif name in params:
        value = params[name]
    else:
        raise ConfigError(f"feed {name!r} has no source in a batch: expected arg.<i>, "
                          "meta.<field> or a const.<k> buffer")
    if isinstance(value, paddle.Tensor):
        value = value.numpy()
    return np.array(value, copy=True)


def run_each(program: paddle.pir.Program, params: Mapping[str, np.ndarray],
             feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Run `program` once per feed dict, in one private scope (weights from `params`); the
    outputs of each run."""
    scope = paddle.static.Scope()
    place = paddle.CPUPlace()
    for op in program.global_block().ops:
        if op.name() == "builtin.parameter":
            name = parameter_name(op)
            scope.var(name).get_tensor().set(np.asarray(params[name]), place)
    names = list(data_ops(program))
    fetch = output_values(program)
    outs = []
    with static_mode(), paddle.static.scope_guard(scope):
        exe = paddle.static.Executor(place)
        for feed in feeds:
            missing = [n for n in names if n not in feed]
            if missing:
                raise KeyError(f"missing feeds: {', '.join(missing)}")
            outs.append(exe.run(program, feed={n: np.asarray(feed[n]) for n in names},
                                fetch_list=fetch))
    return outs
