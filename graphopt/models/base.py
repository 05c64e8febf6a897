"""What a model family provides to graphopt.

A model family (``models/deepseek_v3``, ``models/tiny``) builds a :class:`ModelBundle` from its
Hydra config node. The bundle is everything the pipeline needs from a model:

* ``layer``: the dygraph Layer. Its ``forward(*args, forward_meta)`` is one decoder step and
  returns a tuple ``(logits, *updated_state)``; ``state_fields`` name the meta fields that the
  updated state replaces (e.g. the latent KV caches), in the same order.
* ``meta``: ONE forward-meta object reused across steps (SOT guards on object identity: a new
  object per step retraces the whole model). Batches update its fields in place.
* ``host_inputs``: the meta fields that live on the host and change every step
  (``max_len_tensor_cpu``). They seed the placement analysis.
* ``make_batch(kind, seq_lens, cached_lens)``: fills ``meta`` for one step and returns the step's
  positional tensor args.
* patch bookkeeping for source-stage passes, so a failing pass can be rolled back.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paddle

BATCH_KINDS = ("prefill", "decode", "mixed")
#: marks a patched attribute that the owner only inherited
_INHERITED = object()


@dataclass
class StepBatch:
    """One decoder step: positional tensor args plus the (shared) forward-meta, already filled."""

    kind: str
    args: tuple[paddle.Tensor, ...]
    meta: Any
    seq_lens: list[int]  # new tokens per sequence this step
    cached_lens: list[int]  # tokens already in the cache per sequence

    @property
    def num_tokens(self) -> int:
        return int(sum(self.seq_lens))


@dataclass
class ModelBundle:
    """A built model, ready to run eagerly, to be traced, and to be patched by source passes."""

    name: str
    layer: paddle.nn.Layer
    meta: Any
    host_inputs: tuple[str, ...]
    state_fields: tuple[str, ...]
    make_batch: Callable[..., StepBatch]
    #: random_batch(rng, kind) -> StepBatch: a valid random step of that kind (for verification).
    random_batch: Callable[[np.random.Generator, str], StepBatch]
    #: reset_state(): empty caches (fresh sequences).
    reset_state: Callable[[], None]
    #: pad_batch(batch, num_tokens) -> StepBatch with exactly num_tokens tokens; padding tokens
    #: belong to no sequence, change no real output and no real cache row (capture sizes).
    pad_batch: Callable[[StepBatch, int], StepBatch]
    config: Any = None
    #: where the config and weights came from (path + sha256, or how they were made): report.json
    provenance: dict[str, Any] = field(default_factory=dict)
    #: (owner object, attribute name, original value, patched value), in the order patches
    #: were applied.
    _patches: list[tuple[Any, str, Any, Any]] = field(default_factory=list)

    # -- eager execution ------------------------------------------------------------------
    def step(self, batch: StepBatch, commit: bool = True) -> list[np.ndarray]:
        """Run one step eagerly; return [logits, *state]; write the new state into meta."""
        with paddle.no_grad():
            outs = self.layer(*batch.args, batch.meta)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        if commit:
            self.commit_state(outs[1:])
        return [o.numpy() for o in outs]

    def reference_step(self, batch: StepBatch, commit: bool = False) -> list[np.ndarray]:
        """:meth:`step` of the model as its authors wrote it: every source patch (marked or
        rewritten functions) is undone for the run and put back after it.

        This is what "vs eager" means in verification: comparing with the patched model would
        compare graphopt's rewrite with itself, and a bug in the rewrite would verify.
        """
        with self.as_written():
            return self.step(batch, commit)

    def reference_description(self) -> str:
        """What :meth:`reference_step` runs, in words (report.json names the reference)."""
        n = len(self._patches)
        if not n:
            return "the model as written (eager, no function of it was patched)"
        owners = sorted({f"{_owner_name(o)}.{a}" for o, a, _, _ in self._patches})
        return (f"the model as written (eager; {n} source patch(es) undone for each reference "
                f"step: {', '.join(owners)})")

    def commit_state(self, new_state: list[Any]) -> None:
        """Copy updated state into the meta's tensors in place (identity is kept for SOT)."""
        for field_name, value in zip(self.state_fields, new_state, strict=True):
            target = resolve_meta_field(self.meta, field_name)
            src = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
            paddle.assign(src, output=target)

    # -- source patches (capture-control-flow) --------------------------------------------
    def patch(self, owner: Any, attr: str, new: Any) -> None:
        """Replace ``owner.attr`` (e.g. a Layer class's method), remembering the original."""
        # an inherited attribute is restored by deleting the override, not by shadowing the
        # base class's (a classmethod fetched with getattr would come back bound to the base)
        original = owner.__dict__.get(attr, _INHERITED) if hasattr(owner, "__dict__") else \
            getattr(owner, attr)
        self._patches.append((owner, attr, original, new))
        setattr(owner, attr, new)

    def patch_checkpoint(self) -> int:
        return len(self._patches)

    def restore_patches(self, checkpoint: int = 0) -> None:
        """Undo the patches applied after `checkpoint`, newest first."""
        while len(self._patches) > checkpoint:
            owner, attr, original, _ = self._patches.pop()
            _put_back(owner, attr, original)

    @contextlib.contextmanager
    def as_written(self) -> Iterator[None]:
        """Undo every patch for the block, then apply them again (in their order).

        The patches stay recorded, so rolling back a pass still works afterwards.
        """
        patches = list(self._patches)
        for owner, attr, original, _ in reversed(patches):
            _put_back(owner, attr, original)
        try:
            yield
        finally:
            for owner, attr, _, new in patches:
                setattr(owner, attr, new)


#: bytes of one float32 value: every family builds its parameters and caches in float32
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """What a model's config says it will hold once built, counted before building it.

    Counts the parameters and the KV caches only, at the bytes per value of the dtype they are
    built in (float32: 4). Not counted: Paddle itself, activations, the traced programs,
    captured graphs and verification copies, so a run needs more than this (a 61-layer
    CPU-sized DeepSeek-V3 peaks at about 1.6 GiB, of which 0.23 GiB is counted here): a lower
    bound, good for refusing a config that cannot fit, not for promising that one will.
    """

    parameters: int  #: bytes
    caches: int  #: bytes
    #: the model keys that shrink it most, with their current values (named in the error)
    reduce: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Parameters plus caches, in bytes."""
        return self.parameters + self.caches


def _put_back(owner: Any, attr: str, original: Any) -> None:
    if original is _INHERITED:
        delattr(owner, attr)
    else:
        setattr(owner, attr, original)


def _owner_name(owner: Any) -> str:
    return getattr(owner, "__qualname__", None) or type(owner).__qualname__


def file_provenance(path: str | Path) -> dict[str, Any]:
    """``{"path", "sha256"}`` of a file, or of every file of a directory (sorted by name)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def resolve_meta_field(meta: Any, path: str) -> paddle.Tensor:
    """``"caches.3"`` -> ``meta.caches[3]``; ``"max_len_tensor_cpu"`` -> that attribute;
    ``"kv.3.0"`` -> ``meta.kv[3][0]``; a dict is indexed by key (the paths
    :func:`meta_tensor_fields` gives)."""
    obj = meta
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj[part] if part in obj else obj[int(part)]
        elif isinstance(obj, (list, tuple)):
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


def _fields(obj: Any) -> dict[str, Any]:
    """An object's attributes, ``__dict__`` or ``__slots__`` (slotted dataclasses)."""
    out = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in out and hasattr(obj, name):
                out[name] = getattr(obj, name)
    return out


def meta_tensor_fields(meta: Any, max_depth: int = 4) -> dict[str, paddle.Tensor]:
    """Every tensor reachable from the meta, by path: its attributes, and inside them lists,
    tuples, dicts and plain objects (per-layer ``(k, v)`` cache pairs, a dict of buffers, a
    sub-config), down to `max_depth`. A per-step tensor the walk missed would be frozen into
    the program at its trace-time value, so the walk is generous."""
    out: dict[str, paddle.Tensor] = {}
    seen: set[int] = set()

    def walk(value: Any, path: str, depth: int) -> None:
        if isinstance(value, paddle.Tensor):
            out.setdefault(path, value)
            return
        if (depth >= max_depth or id(value) in seen
                or isinstance(value, (str, bytes, int, float, bool, type(None), paddle.nn.Layer))):
            return  # a Layer (an attention backend) holds weights, not per-step inputs
        seen.add(id(value))
        if isinstance(value, dict):
            items = [(str(k), v) for k, v in value.items() if isinstance(k, (str, int))
                     and "." not in str(k)]
        elif isinstance(value, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(value)]
        elif depth == 0 or hasattr(value, "__dict__") or hasattr(type(value), "__slots__"):
            if callable(value) or isinstance(value, type):
                return
            items = [(k, v) for k, v in _fields(value).items()
                     if depth == 0 or not k.startswith("_")]
        else:
            return
        for key, v in items:
            walk(v, f"{path}.{key}" if path else key, depth + 1)

    walk(meta, "", 0)
    return out
