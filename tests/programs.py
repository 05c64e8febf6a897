"""Hand-built PIR programs shaped like what SOT produces for the seed's MLA step.

Every program follows the ``runtime.model_program`` conventions: ``arg.0`` is the step's hidden
states (float32 [T, 8]), ``meta.caches.0`` a float32 [4, 8] state tensor, weights are
``builtin.parameter`` ops ``w1``/``w2`` (values in the returned params), outputs are
``[logits, new_cache]`` as ``builtin.shadow_output`` ops.

Per layer, two ``pd_op.if`` with visibly different branches, as in ``prefill_or_decode``:

* prefill: ``cond(max_len[1] > 0)``: ``relu(h @ w1)`` else ``h``;
* decode:  ``cond(max_len[2] > 0)``: ``tanh(y @ w2)`` else ``y``.

``hoisted=False`` computes each condition inside the program the way the seed did
(``cast(slice(meta.max_len_tensor_cpu, i:i+1), bool)``): a replay hazard. ``hoisted=True`` reads
the conditions from ``hoisted.0`` / ``hoisted.1`` data ops fed by a :class:`HostPrologue`, which
is what hoist-host-branch-conditions produces.
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import paddle

from graphopt.ir.model_program import HostPrologue, ModelProgram
from graphopt.ir.pir_utils import add_output, static_mode
from graphopt.models.base import StepBatch
from graphopt.runtime.executor import ProgramRunner

HIDDEN = 8
CACHE_ROWS = 4
HOST_INPUT = "meta.max_len_tensor_cpu"


@dataclass
class Built:
    """A built program plus what running it needs."""

    program: paddle.pir.Program
    params: dict[str, np.ndarray]
    host_inputs: list[str]
    prologue: HostPrologue | None = None
    blacklist: list[str] = field(default_factory=list)


def _params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w1": rng.standard_normal((HIDDEN, HIDDEN)).astype("float32"),
        "w2": rng.standard_normal((HIDDEN, HIDDEN)).astype("float32"),
    }


def _host_cond(max_len: paddle.pir.Value, i: int) -> paddle.pir.Value:
    # the seed's `if forward_meta.max_len_tensor_cpu[i]:` -> slice + cast(bool), on the host
    return paddle.cast(max_len[i : i + 1], "bool")


def build_cond_program(hoisted: bool = False, layers: int = 1, seed: int = 0) -> Built:
    """The seed-shaped program with two ifs per layer (see the module docstring)."""
    with static_mode():
        main = paddle.static.Program()
        startup = paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            x = paddle.static.data("arg.0", [-1, HIDDEN], "float32")
            cache = paddle.static.data("meta.caches.0", [CACHE_ROWS, HIDDEN], "float32")
            if hoisted:
                needs_prefill = paddle.static.data("hoisted.0", [1], "bool")
                needs_decode = paddle.static.data("hoisted.1", [1], "bool")
            else:
                max_len = paddle.static.data(HOST_INPUT, [3], "int32")
            w1 = paddle.static.create_parameter([HIDDEN, HIDDEN], "float32", name="w1")
            w2 = paddle.static.create_parameter([HIDDEN, HIDDEN], "float32", name="w2")
            h = x * 2.0
            for _ in range(layers):
                c1 = needs_prefill if hoisted else _host_cond(max_len, 1)
                y = paddle.static.nn.cond(
                    c1,
                    lambda h=h: paddle.nn.functional.relu(paddle.matmul(h, w1)),
                    lambda h=h: h,
                )
                c2 = needs_decode if hoisted else _host_cond(max_len, 2)
                z = paddle.static.nn.cond(
                    c2,
                    lambda y=y: paddle.tanh(paddle.matmul(y, w2)),
                    lambda y=y: y,
                )
                h = z + 1.0
            logits = h
            new_cache = paddle.tanh(paddle.matmul(cache, w1)) + 1.0
        add_output(main, logits, "logits")
        add_output(main, new_cache, "state.0")
    prologue = build_prologue() if hoisted else None
    return Built(main, _params(np.random.default_rng(seed)), [HOST_INPUT], prologue)


def build_prologue() -> HostPrologue:
    """The host prologue the hoist pass would produce: needs_prefill / needs_decode."""
    with static_mode():
        prog = paddle.static.Program()
        with paddle.static.program_guard(prog, paddle.static.Program()):
            max_len = paddle.static.data(HOST_INPUT, [3], "int32")
            needs_prefill = _host_cond(max_len, 1)
            needs_decode = _host_cond(max_len, 2)
        add_output(prog, needs_prefill, "hoisted.0")
        add_output(prog, needs_decode, "hoisted.1")
    return HostPrologue(prog, ["hoisted.0", "hoisted.1"])


def build_plain_program(seed: int = 0) -> Built:
    """No control flow: ``relu((2x) @ w1) @ w2`` and the cache update."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main, paddle.static.Program()):
            x = paddle.static.data("arg.0", [-1, HIDDEN], "float32")
            cache = paddle.static.data("meta.caches.0", [CACHE_ROWS, HIDDEN], "float32")
            w1 = paddle.static.create_parameter([HIDDEN, HIDDEN], "float32", name="w1")
            w2 = paddle.static.create_parameter([HIDDEN, HIDDEN], "float32", name="w2")
            logits = paddle.matmul(paddle.nn.functional.relu(paddle.matmul(x * 2.0, w1)), w2)
            new_cache = paddle.tanh(paddle.matmul(cache, w1)) + 1.0
        add_output(main, logits, "logits")
        add_output(main, new_cache, "state.0")
    return Built(main, _params(np.random.default_rng(seed)), [])


# -- a minimal model stand-in (what ModelProgram.model must offer the runtime) ---------------
def make_meta(max_len: list[int], rng: np.random.Generator | None = None) -> SimpleNamespace:
    rng = rng or np.random.default_rng(0)
    return SimpleNamespace(
        max_len_tensor_cpu=paddle.to_tensor(np.asarray(max_len, dtype="int32")),
        caches=[paddle.to_tensor(rng.standard_normal((CACHE_ROWS, HIDDEN)).astype("float32"))],
    )


def make_batch(num_tokens: int, max_len: list[int], rng: np.random.Generator,
               meta: SimpleNamespace | None = None) -> StepBatch:
    """One step: `num_tokens` rows of hidden states; the meta's host tensor updated IN PLACE
    when a shared meta is given (the way a serving loop reuses one forward-meta object)."""
    x = paddle.to_tensor(rng.standard_normal((num_tokens, HIDDEN)).astype("float32"))
    if meta is None:
        meta = make_meta(max_len, rng)
    else:
        paddle.assign(paddle.to_tensor(np.asarray(max_len, dtype="int32")),
                      output=meta.max_len_tensor_cpu)
    kind = "mixed" if max_len[1] and max_len[2] else ("prefill" if max_len[1] else "decode")
    return StepBatch(kind, (x,), meta, [num_tokens], [0])


def pad_batch(batch: StepBatch, num_tokens: int) -> StepBatch:
    """Pad the hidden states with zero rows: every op here is row-wise, so real rows are kept."""
    x = batch.args[0].numpy()
    pad = np.zeros((num_tokens - x.shape[0], x.shape[1]), dtype=x.dtype)
    return StepBatch(batch.kind, (paddle.to_tensor(np.concatenate([x, pad])),), batch.meta,
                     list(batch.seq_lens), list(batch.cached_lens))


@dataclass
class ToyModel:
    """What the runtime needs from ``mp.model``: a name, host inputs, state fields, pad_batch,
    and random batches of each kind (specialize-branches samples them)."""

    name: str = "toy"
    host_inputs: tuple[str, ...] = ("max_len_tensor_cpu",)
    state_fields: tuple[str, ...] = ("caches.0",)
    pad_calls: list[tuple[int, int]] = field(default_factory=list)

    def pad_batch(self, batch: StepBatch, num_tokens: int) -> StepBatch:
        self.pad_calls.append((batch.num_tokens, num_tokens))
        return pad_batch(batch, num_tokens)

    def random_batch(self, rng: np.random.Generator, kind: str) -> StepBatch:
        """A step of `kind` with 1..8 tokens and random host values: prefill ``[t, t, 0]``,
        decode ``[t, 0, t]``, mixed ``[t, t, t]`` (so both conditions false never occurs)."""
        t = int(rng.integers(1, 9))
        prefill, decode = {"prefill": (1, 0), "decode": (0, 1), "mixed": (1, 1)}[kind]
        return make_batch(t, [t, prefill * t, decode * t], rng)


def model_program(built: Built, blacklist: list[str] | None = None) -> ModelProgram:
    """A ModelProgram around a hand-built program, with the toy model stand-in."""
    mp = ModelProgram(model=ToyModel())  # type: ignore[arg-type]
    mp.program = built.program
    mp.params = dict(built.params)
    mp.host_inputs = list(built.host_inputs)
    mp.prologue = built.prologue
    mp.blacklist = list(blacklist if blacklist is not None else ["pd_op.if"])
    mp.properties.update({"traced", "single-graph"})
    return mp


def feeds_for(built: Built, batch: StepBatch) -> dict[str, Any]:
    """The whole program's feeds for a step (prologue included) -- test reference path."""
    feeds: dict[str, Any] = {
        "arg.0": batch.args[0].numpy(),
        "meta.caches.0": batch.meta.caches[0].numpy(),
        HOST_INPUT: batch.meta.max_len_tensor_cpu.numpy(),
    }
    if built.prologue is not None:
        outs = run_program(built.prologue.program, {}, feeds)
        feeds.update(zip(built.prologue.outputs, outs, strict=True))
    return feeds


def build_nested_program(seed: int = 0) -> Built:
    """An if inside an if branch (conditions from hoisted.0 / hoisted.1), to exercise the
    recursion: ``h = 2x; y = cond(p, relu(h@w1) then cond(d, tanh(.@w2), .) + 1, h) - 1``."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main, paddle.static.Program()):
            x = paddle.static.data("arg.0", [-1, HIDDEN], "float32")
            cache = paddle.static.data("meta.caches.0", [CACHE_ROWS, HIDDEN], "float32")
            needs_prefill = paddle.static.data("hoisted.0", [1], "bool")
            needs_decode = paddle.static.data("hoisted.1", [1], "bool")
            w1 = paddle.static.create_parameter([HIDDEN, HIDDEN], "float32", name="w1")
            w2 = paddle.static.create_parameter([HIDDEN, HIDDEN], "float32", name="w2")
            h = x * 2.0

            def outer_true() -> paddle.pir.Value:
                a = paddle.nn.functional.relu(paddle.matmul(h, w1))
                b = paddle.static.nn.cond(needs_decode,
                                          lambda: paddle.tanh(paddle.matmul(a, w2)),
                                          lambda: a)
                return b + 1.0

            y = paddle.static.nn.cond(needs_prefill, outer_true, lambda: h)
            logits = y - 1.0
            new_cache = cache * 0.5
        add_output(main, logits, "logits")
        add_output(main, new_cache, "state.0")
    return Built(main, _params(np.random.default_rng(seed)), [HOST_INPUT], build_prologue())


def data_names(program: paddle.pir.Program) -> list[str]:
    """The feed names of a program, in program order."""
    from graphopt.ir.pir_utils import data_ops

    return list(data_ops(program))


def run_program(program: paddle.pir.Program, params: dict[str, Any],
                feeds: dict[str, Any]) -> list[np.ndarray]:
    """One-shot: run `program` once and return its outputs as arrays."""
    return [o.numpy() for o in ProgramRunner(program, params).run(feeds)]


def build_chunked_loop_program(seed: int = 0, chunk: int = 4) -> Built:
    """FastDeploy's chunked MoE shape: a ``pd_op.while`` over a host trip count appending each
    chunk's ``relu(2x @ w1)`` to a tensor array, concatenated after the loop, then ``@ w2``.
    The array (``pd_op.create_array``) is defined before the loop and read after it."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main, paddle.static.Program()):
            x = paddle.static.data("arg.0", [-1, HIDDEN], "float32")
            num_chunks = paddle.static.data("meta.num_chunks", [1], "int32")
            w1 = paddle.static.create_parameter([HIDDEN, HIDDEN], "float32", name="w1")
            w2 = paddle.static.create_parameter([HIDDEN, HIDDEN], "float32", name="w2")
            h = x * 2.0
            pad = paddle.concat([h, paddle.zeros([chunk, HIDDEN], "float32")])
            outs = paddle.tensor.create_array("float32")
            i = paddle.zeros([1], "int32")

            def cond(i, outs):
                return paddle.less_than(i, num_chunks)

            def body(i, outs):
                rows = paddle.arange(chunk, dtype="int32") + i * chunk
                part = paddle.nn.functional.relu(paddle.matmul(paddle.gather(pad, rows), w1))
                paddle.tensor.array_write(part, paddle.cast(i, "int64"), array=outs)
                return i + 1, outs

            _, outs = paddle.static.nn.while_loop(cond, body, [i, outs])
            joined = paddle.concat(outs)  # array_to_tensor of the array
            logits = paddle.matmul(joined[: paddle.shape(x)[0]], w2)
        add_output(main, logits, "logits")
    return Built(main, _params(np.random.default_rng(seed)), ["meta.num_chunks"])
