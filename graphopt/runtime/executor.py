"""Run a PIR program with Paddle's static Executor, outside SOT.

Weights go into a private ``paddle.static.Scope`` once; per-step inputs are fed by value every
run: a program holding a tensor by reference would miss a replaced tensor. Outputs come back as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import paddle

from graphopt.ir.pir_utils import data_ops, output_values, static_mode


class ProgramRunner:
    """A program + its weights, ready to run many times with different feeds."""

    def __init__(
        self,
        program: paddle.pir.Program,
        params: Mapping[str, np.ndarray],
        fetch: Sequence[paddle.pir.Value] | None = None,
    ) -> None:
        self.program = program
        self.fetch = list(fetch) if fetch is not None else output_values(program)
        self.feed_names = list(data_ops(program))
        self.scope = paddle.static.Scope()
        self.place = paddle.CPUPlace()
        with static_mode():
            self.exe = paddle.static.Executor(self.place)
        needed = {
            op.attrs()["parameter_name"]
            for op in program.global_block().ops
            if op.name() == "builtin.parameter"
        }
        missing = sorted(needed - set(params))
        if missing:
            raise KeyError(f"program needs parameters with no value: {', '.join(missing[:8])}")
        for name in needed:
            self.scope.var(name).get_tensor().set(np.asarray(params[name]), self.place)
        # `const.*` feeds: tensors the model holds that are not parameters (see runtime.trace).
        self.constants = {n: np.asarray(params[n]) for n in self.feed_names if n in params}

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; `feeds` must hold every pd_op.data name of the program but `const.*`."""
        feed = {}
        for n in self.feed_names:
            if n in feeds:
                feed[n] = np.asarray(feeds[n])
            elif n in self.constants:
                feed[n] = self.constants[n]
        missing = [n for n in self.feed_names if n not in feed]
        if missing:
            raise KeyError(f"missing feeds: {', '.join(missing)}")
        with static_mode(), paddle.static.scope_guard(self.scope):
            return self.exe.run(self.program, feed=feed, fetch_list=self.fetch)
