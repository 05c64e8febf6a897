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
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import paddle

from graphopt.cache import CacheError, CompileCache, Entry, load_entry, read_meta
from graphopt.models import build_model
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
    keyed = CompileCache(cache_dir or "~/.cache/graphopt").path(str(source))
    if (keyed / "entry.json").is_file():
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
) -> StepExecutor | VariantStepExecutor:
    """A ready step executor for the optimized step saved at `source` (see module docstring).

    ``backend`` is a registered execution backend (``emulator`` on CPU, ``torch_cuda`` on a GPU
    with PyTorch, ``none`` or ``torch_cpu`` to run segments uncaptured, ``cuda`` on a CUDA build
    of Paddle). A step optimized with specialize-branches comes back as a
    :class:`VariantStepExecutor` (one if-free variant per branch combination, the general plan
    for the rest), as the run that saved it verified. A step saved without a segment plan
    raises: use :func:`load_whole` for it.
    """
    entry = _load(source, cache_dir)
    executor = VariantStepExecutor if entry.mp.variants else StepExecutor
    return executor(entry.mp, backend=backend, capture_sizes=capture_sizes,
                    num_warmups=num_warmups)


def load_whole(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
               ) -> WholeProgramStep:
    """The saved optimized program as one step, run in one call (no segments, no capture)."""
    return WholeProgramStep(_load(source, cache_dir).mp)


def _load(source: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Entry:
    path = resolve_entry(source, cache_dir)
    meta = read_meta(path)
    model = meta.get("material", {}).get("model") if isinstance(meta.get("material"), dict) else None
    if not isinstance(model, dict):
        raise CacheError(f"{path / 'entry.json'} names no model config (malformed entry)")
    bundle = build_model(model)
    entry = load_entry(path, bundle)
    if entry.mp.flags:
        paddle.set_flags(dict(entry.mp.flags))
    return entry
