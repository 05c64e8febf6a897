"""Serve an optimized step without tracing: ``load(run_dir_or_cache_key)``.

This is how an inference engine consumes graphopt's output::

    from graphopt.serving import load

    step = load("outputs/2026-11-28/10-00-00")      # a run directory (its compiled/ entry)
    step = load("3f2a...", cache_dir="~/.cache/graphopt")   # or a compile-cache key
    batch = step.mp.model.make_batch(...)            # the model's own batch builder
    logits, *state = step.run(batch)                 # tensors in, tensors out
    step.mp.model.commit_state(state)

The model is rebuilt from the config saved with the entry (its weights must hash the same), the
optimized program, host prologue and flags are loaded, and the segment plan is cut again. Nothing
is traced.

A run directory or a cache entry is data, not code. Before anything of it is used, its key must
be the hash of its material and every file must match its checksum; it may set only the Paddle
flags graphopt records, and its programs may not hold ops that touch files. Its model is built
only by a trusted builder: one of graphopt's families, a ``graphopt.models`` entry point of an
installed package, or one the caller names (``builder="pkg.module.build"``). Any other
``_target_`` is refused, with nothing run, unless the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import paddle

from graphopt.cache import (
    CacheError,
    CompileCache,
    Entry,
    UntrustedEntryError,
    load_entry,
    read_meta,
    verify_entry,
)
from graphopt.models import build_model, untrusted_targets
from graphopt.runtime.capture import DEFAULT_CAPTURE_SIZES
from graphopt.runtime.step import StepExecutor, WholeProgramStep
from graphopt.runtime.variants import VariantStepExecutor

#: where a run directory keeps its loadable entry
RUN_DIR_ENTRY = "compiled"


def resolve_entry(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The entry directory `source` names: an entry itself, a run directory (its ``compiled/``),
    or a key in `cache_dir` (default ``~/.cache/graphopt``)."""
    path = Path(os.path.expanduser(str(source)))
    for candidate in (path, path / RUN_DIR_ENTRY):
        if (candidate / "entry.json").is_file():
            return candidate
    if (path / "report.json").is_file():  # a run directory, but nothing to serve in it
        raise CacheError(f"{source}: a run directory without a {RUN_DIR_ENTRY}/ entry: its run "
                         "kept no single optimized program (pipeline=none, or the step stayed "
                         "several SOT graphs); run a pipeline that makes one, e.g. "
                         "pipeline=cudagraph")
    cache = CompileCache(cache_dir or "~/.cache/graphopt")
    keyed = cache.path(str(source))
    if (keyed / "entry.json").is_file():
        unsafe = cache.unsafe()
        if unsafe:
            print(f"graphopt: warning: cache dir {cache.dir}: {unsafe}; anyone who can write "
                  "there can plant entries (README, 'Sharing a cache')", file=sys.stderr)
        return keyed
    raise CacheError(f"{source}: not an entry, a run directory with {RUN_DIR_ENTRY}/, or a key "
                     f"in {keyed.parent}")


def load(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    backend: str = "emulator",
    capture_sizes: Sequence[int] = DEFAULT_CAPTURE_SIZES,
    num_warmups: int = 1,
    builder: str | None = None,
    trust_remote_code: bool = False,
) -> StepExecutor | VariantStepExecutor:
    """A ready step executor for the optimized step saved at `source` (see module docstring).

    ``backend`` is a registered execution backend (``emulator`` on CPU, ``torch_cuda`` on a GPU
    with PyTorch, ``none`` or ``torch_cpu`` to run segments uncaptured, ``cuda`` on a CUDA build
    of Paddle). A step optimized with specialize-branches comes back as a
    :class:`VariantStepExecutor` (one if-free variant per branch combination, the general plan
    for the rest), as the run that saved it verified. A step saved without a segment plan
    raises: use :func:`load_whole` for it.

    ``builder`` names the model builder you expect the entry to use (``module.function``), for
    a model of your own; ``trust_remote_code=True`` accepts any builder it names (see the module
    docstring: only for entries from people you trust).
    """
    entry = _load(source, cache_dir, builder, trust_remote_code)
    executor = VariantStepExecutor if entry.mp.variants else StepExecutor
    return executor(entry.mp, backend=backend, capture_sizes=capture_sizes,
                    num_warmups=num_warmups)


def load_whole(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
               builder: str | None = None, trust_remote_code: bool = False
               ) -> WholeProgramStep:
    """The saved optimized program as one step, run in one call (no segments, no capture)."""
    return WholeProgramStep(_load(source, cache_dir, builder, trust_remote_code).mp)


def _load(source: str | os.PathLike, cache_dir: str | os.PathLike | None,
          builder: str | None = None, trust_remote_code: bool = False) -> Entry:
    path = resolve_entry(source, cache_dir)
    meta = read_meta(path)
    verify_entry(path, meta)  # before anything of it is used
    model = meta["material"].get("model")
    if not isinstance(model, dict):
        raise CacheError(f"{path / 'entry.json'} names no model config (malformed entry)")
    foreign = untrusted_targets(model, [builder] if builder else [])
    if foreign and not trust_remote_code:
        raise UntrustedEntryError(
            f"{path}: its model would run {foreign[0]!r}, which is not a graphopt family, a "
            "graphopt.models entry point or the builder you named; nothing was run. If you "
            f"trust whoever made it: load(..., builder={foreign[0]!r}) or "
            "load(..., trust_remote_code=True)")
    bundle = build_model(model)
    entry = load_entry(path, bundle)
    if entry.mp.flags:
        paddle.set_flags(dict(entry.mp.flags))
    return entry
